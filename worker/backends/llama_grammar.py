"""Constrained decoding for the llama.cpp backend: GBNF grammars and a per-sequence sampler.

A `Constraint` becomes GBNF: JSON Schema through llama-cpp-python's converter, tool calls
as the model's call wrapper around one schema per tool (rules renamed per tool so several
compose). `auto` tool choice uses a lazy grammar (`llama_sampler_init_grammar_lazy_patterns`):
free text until a trigger pattern (the call's opening tag) matches, constrained from there.

Sampling follows llama.cpp's own common sampler: the sequence's ordinary chain picks a
token; only if the grammar rejects it (checked on that one candidate, ~5 us) is it
resampled under the grammar. Resampling first tries the `TOP` highest logits (the grammar
over the whole vocabulary costs ~10-25 ms here, more than a decode step): the best allowed
token is among them whenever any of them is allowed, so greedy decoding is exact; sampled
decoding draws from those candidates (the rest hold a negligible share of the mass), and
falls back to the whole vocabulary when none is allowed. Unconstrained sequences never run
any of this.
A token is accepted by the grammar only after the check allowed it, and never an
end-of-generation token, so llama.cpp's grammar never reaches its abort paths.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from worker.tools.constraint import Constraint

TOP = 256  # candidates tried first when the chain's pick is refused
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
_LEX = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z][A-Za-z0-9_-]*|.', re.S)
_RULE = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*) ::= ", re.M)
WS = r"ws ::= [ \t\n]{0,2}"


_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def _bounded_strings(node: Any, found: list[tuple[int, int | None]]) -> Any:
    """The schema with every length-bounded string as a placeholder constant.

    The converter spells `maxLength: n` as n nested optionals (a 1,000-character bound
    breaks llama.cpp's parser); GBNF's own `{m,n}` repetition replaces them afterwards."""
    if isinstance(node, list):
        return [_bounded_strings(v, found) for v in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "string" and ("minLength" in node or "maxLength" in node) \
            and "pattern" not in node and "format" not in node and "enum" not in node \
            and "const" not in node:
        found.append((int(node.get("minLength", 0)), node.get("maxLength")))
        return {"const": f"CORRALSTR{len(found) - 1}"}
    return {k: _bounded_strings(v, found) if k not in ("enum", "const") else v
            for k, v in node.items()}


def schema_rules(schema: dict[str, Any], prefix: str) -> tuple[str, str]:
    """GBNF rules for a JSON Schema, every rule name prefixed; returns (root name, rules)."""
    bounded: list[tuple[int, int | None]] = []
    gbnf = json_schema_to_gbnf(json.dumps(_bounded_strings(schema, bounded)))
    # JSON forbids raw control characters in strings; the converter's `char` allows them.
    gbnf = gbnf.replace('[^"\\\\] | "\\\\"', '[^"\\\\\\x7F\\x00-\\x1F] | "\\\\"')
    for i, (lo, hi) in enumerate(bounded):
        rep = f"{{{lo},{'' if hi is None else int(hi)}}}"
        gbnf = gbnf.replace(f'"\\"CORRALSTR{i}\\""', f'"\\"" bchar{rep} "\\"" bspace')
    if bounded:
        gbnf += f'\nbchar ::= {_CHAR}\nbspace ::= " "?'
    names = set(_RULE.findall(gbnf))

    def rename(m: re.Match[str]) -> str:
        tok = m.group(0)
        return f"{prefix}{tok}" if tok in names else tok

    out = []
    for line in gbnf.splitlines():
        head = _RULE.match(line)
        if head:
            body = line[head.end():]
            out.append(f"{prefix}{head.group(1)} ::= " + _LEX.sub(rename, body))
        elif line.strip():
            out.append(_LEX.sub(rename, line))
    return f"{prefix}root", "\n".join(out)


def _lit(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid GBNF literal


def compile_gbnf(c: Constraint) -> tuple[str, list[str]]:
    """(GBNF with a `root` rule, lazy trigger patterns: empty for an eager grammar)."""
    if c.kind == "json_object":
        root, rules = schema_rules({"type": "object"}, "o-")
        return f"root ::= {root}\n{rules}", []
    if c.kind == "json_schema":
        assert c.schema is not None
        root, rules = schema_rules(c.schema, "s-")
        return f"root ::= {root}\n{rules}", []
    assert c.fmt is not None
    fmt = c.fmt
    alts, parts = [], []
    for i, (name, schema) in enumerate(c.tools):
        root, rules = schema_rules(schema, f"t{i}-")
        parts.append(rules)
        alts.append(f"t{i}-call")
        parts.append(f'''t{i}-call ::= {_lit(json.dumps(name))} ws "," ws '''
                     f'''{_lit(json.dumps(fmt.args_key))} ws ":" ws {root}''')
    body = f'"{{" ws {_lit(json.dumps("name"))} ws ":" ws ( {" | ".join(alts)} ) ws "}}"'
    call = f'{_lit(fmt.begin)} "\\n"? {body} "\\n"? {_lit(fmt.end)}' if fmt.begin else body
    many = c.parallel and bool(fmt.begin)
    head = "root ::= call" + (' ( "\\n"? call )*' if many else "")
    gbnf = "\n".join([head, f"call ::= {call}", WS, *parts])
    if c.mode != "auto":
        return gbnf, []
    if fmt.begin:
        return gbnf, [r"[\s\S]*?(" + re.escape(fmt.begin) + r")[\s\S]*"]
    return gbnf, [r"\s*(\{)[\s\S]*"]


class GrammarSampler:
    """A grammar for one sequence and the buffers to sample with it (loop thread only)."""

    def __init__(self, vocab: Any, n_vocab: int, gbnf: str, patterns: list[str]) -> None:
        if patterns:
            arr = (ctypes.c_char_p * len(patterns))(*(p.encode() for p in patterns))
            smpl = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                vocab, gbnf.encode(), b"root", arr, len(patterns), None, 0)
        else:
            smpl = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not smpl:
            raise ValueError("llama.cpp could not parse the grammar")
        self.smpl = smpl
        self.n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._all = np.zeros(n_vocab, _TOKEN_DATA)
        self._all_arr = self._array(self._all)
        self._one = np.zeros(1, _TOKEN_DATA)
        self._one_arr = self._array(self._one)
        self._top = np.zeros(min(TOP, n_vocab), _TOKEN_DATA)
        self._top_arr = self._array(self._top)
        self.resampled = 0

    @staticmethod
    def _array(buf: np.ndarray) -> Any:
        ptr = ctypes.cast(buf.ctypes.data, ctypes.POINTER(llama_cpp.llama_token_data))
        return llama_cpp.llama_token_data_array(data=ptr, size=len(buf), selected=-1,
                                                sorted=False)

    def allows(self, token: int) -> bool:
        self._one[0] = (token, 0.0, 0.0)
        self._one_arr.size, self._one_arr.selected, self._one_arr.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self.smpl, ctypes.byref(self._one_arr))
        return bool(np.isfinite(self._one[0]["logit"]))

    def prime(self, tokens: list[int]) -> None:
        """Advances over text generated before (a continued answer); ValueError if it
        does not fit the grammar."""
        for t in tokens:
            if not self.allows(t):
                raise ValueError("the text already generated does not fit the constraint")
            llama_cpp.llama_sampler_accept(self.smpl, t)

    def _fill(self, logits: np.ndarray) -> None:
        a = self._all
        a["id"] = self._ids
        a["logit"] = logits
        a["p"] = 0.0
        arr = self._all_arr
        arr.size, arr.selected, arr.sorted = self.n_vocab, -1, False

    def sample(self, chain: Any, ctx: Any, idx: int, row: Callable[[int], np.ndarray],
               is_eog: Callable[[int], bool], stateful: bool = False) -> int:
        """The next token under the grammar; accepted into the chain and the grammar.

        `row(idx)` is the step's logits row `idx` as numpy (the batch loop's
        `LogitsRows`, a view made once per row address rather than per call).
        `stateful`: the chain remembers accepted tokens (penalties), so a refused pick must
        not reach it; otherwise llama.cpp's own sample-and-accept picks first."""
        if stateful:
            self._fill(row(idx))
            llama_cpp.llama_sampler_apply(chain, ctypes.byref(self._all_arr))
            token = int(self._all[self._all_arr.selected]["id"])
        else:
            token = llama_cpp.llama_sampler_sample(chain, ctx, idx)
        if not self.allows(token):
            self.resampled += 1
            token = self._resample(chain, row(idx))
        if stateful:
            llama_cpp.llama_sampler_accept(chain, token)
        if not is_eog(token):
            llama_cpp.llama_sampler_accept(self.smpl, token)
        return token

    def _resample(self, chain: Any, logits: np.ndarray) -> int:
        k = len(self._top)
        if k < self.n_vocab:
            top = self._top
            ids = np.argpartition(logits, -k)[-k:]
            top["id"] = ids
            top["logit"] = logits[ids]
            top["p"] = 0.0
            arr = self._top_arr
            arr.size, arr.selected, arr.sorted = k, -1, False
            llama_cpp.llama_sampler_apply(self.smpl, ctypes.byref(arr))
            if np.isfinite(top["logit"]).any():
                llama_cpp.llama_sampler_apply(chain, ctypes.byref(arr))
                return int(top[arr.selected]["id"])
        self._fill(logits)
        llama_cpp.llama_sampler_apply(self.smpl, ctypes.byref(self._all_arr))
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(self._all_arr))
        pick = self._all[self._all_arr.selected]
        if not np.isfinite(pick["logit"]):
            raise RuntimeError("the grammar allows no token here")
        return int(pick["id"])

    def free(self) -> None:
        smpl, self.smpl = self.smpl, None
        if smpl:
            llama_cpp.llama_sampler_free(smpl)

    def __del__(self) -> None:
        self.free()


def sampler_for(backend: Any, c: Constraint) -> GrammarSampler:
    """A primed grammar sampler for one request, or a 400 naming what cannot be enforced."""
    from wire.errors import bad_request

    param = "tools" if c.kind == "tools" else "response_format"
    try:
        gbnf, patterns = compile_gbnf(c)
    except Exception as exc:  # the converter asserts on schemas it does not know
        raise bad_request(f"The schema cannot be turned into a grammar: {exc}",
                          param=param) from None
    vocab = backend._vocab
    try:
        g = GrammarSampler(vocab, llama_cpp.llama_vocab_n_tokens(vocab), gbnf, patterns)
    except ValueError as exc:
        raise bad_request(f"The constraint cannot be enforced: {exc}", param=param) from None
    if c.prefix:
        try:
            g.prime(text_tokens(vocab, c.prefix))
        except ValueError as exc:
            g.free()
            raise bad_request(f"continue_final_message: {exc}", param="messages") from None
    return g


def text_tokens(vocab: Any, text: str) -> list[int]:
    """Tokens of plain generated text (no BOS, special tokens not parsed)."""
    data = text.encode("utf-8")
    cap = len(data) + 8
    buf = (llama_cpp.llama_token * cap)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, False, False)
    if n < 0:
        cap = -n
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, False, False)
    return list(buf[:n])
