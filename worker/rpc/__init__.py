"""llama.cpp RPC: shard hosts (ggml RPC servers) and split heads, each in a child process."""
