"""The config file is validated at start: a typo is an error, never silently ignored.

`rmp = 1` in an `[[api_keys]]` entry used to leave that key unlimited, and a `[gatway]`
table to tune nothing. Now `corral gateway` / `corral up` refuse the file with one message
naming the file, the key path and the nearest valid name, exit 2, no traceback. Every config
that was valid before still loads to the same values.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
from procs import corral, free_port

from gateway.config import GatewayConfig
from gateway.config_file import ConfigError, load, load_config

TYPOS = """cluster_token = "from-the-file"
[[api_keys]]
key = "sk-alice-secret"
user = "alice"
rmp = 60
[gatway]
queue_size = 3
"""


def _finish(*args: str) -> tuple[int, str]:
    p = corral(*args, name="corral-config")
    try:
        rc = p.popen.wait(60)
        return rc, p.log()
    finally:
        p.stop()


@pytest.mark.parametrize("command", ["gateway", "up"])
def test_a_typo_stops_the_command_with_a_clear_message(tmp_path: Path, command: str) -> None:
    conf = tmp_path / "corral.toml"
    conf.write_text(TYPOS)
    rc, out = _finish(command, "--port", str(free_port()), "--config", str(conf))
    assert rc == 2, out
    assert str(conf) in out
    assert "unknown key 'api_keys[0].rmp'; did you mean 'api_keys[0].rpm'?" in out, out
    assert "unknown table 'gatway'; did you mean 'gateway'?" in out, out
    assert "Traceback" not in out and "sk-alice-secret" not in out, out
    assert len(out.strip().splitlines()) == 2, out  # one line per problem, nothing else


@pytest.mark.parametrize(("text", "expected"), [
    ('[[api_keys]]\nkey = "k"\nrpm = -1\n', "api_keys[0].rpm: Input should be greater than"),
    ('[[api_keys]]\nuser = "u"\n', "api_keys[0].key: Field required"),
    ('[[api_keys]]\nkey = ""\n', "api_keys[0].key: String should have at least 1 character"),
    ('[gateway]\nqueue_size = "many"\n', "gateway.queue_size: Input should be a valid integer"),
    ('[gateway]\nprobe_intervall = 1\n', "unknown key 'gateway.probe_intervall'; "
                                         "did you mean 'gateway.probe_interval'?"),
    ('model = ["m"]\n', "unknown key 'model'; did you mean 'models'?"),
    ("[nothing_like_it]\n", "unknown table 'nothing_like_it'; valid here: api_keys, "),
    ('workers = "http://a:1"\n', "workers: Input should be a valid list"),
    ("x = \n", "not valid TOML"),
])
def test_each_problem_names_the_file_and_the_key(tmp_path: Path, text: str,
                                                 expected: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(str(conf))
    assert str(e.value).startswith(f"{conf}: ") and expected in str(e.value), str(e.value)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load(str(tmp_path / "nope.toml"))


def _ns(config: Path | None) -> argparse.Namespace:
    return argparse.Namespace(host="h", port=1, worker=[], model=[], config=config and str(config),
                              cluster_token=None, redis_url=None, log_level=None)


def test_every_valid_setting_still_loads_with_the_same_meaning(tmp_path: Path) -> None:
    conf = tmp_path / "corral.toml"
    conf.write_text('cluster_token = "t"\nredis_url = "redis://r:6379/0"\n'
                    'workers = ["http://a:1/"]\nmodels = ["x", "x"]\n'
                    '[[api_keys]]\nkey = "sk-1"\nuser = "u"\nrpm = 5\ntpm = 1000\n'
                    '[[api_keys]]\nkey = "sk-2"\n'
                    '[gateway]\nprobe_interval = 1\nqueue_size = 7\nlean_transport = false\n'
                    'affinity = false\nmax_body_bytes = 1024\nstall_timeout = 0\n'
                    'down_grace = 2.5\n')
    cfg = load_config(_ns(conf))
    assert cfg.cluster_token == "t" and cfg.redis_url == "redis://r:6379/0"
    assert cfg.workers == ["http://a:1"] and cfg.models == ["x"]
    assert [(k.key, k.user, k.rpm, k.tpm) for k in cfg.api_keys] == [
        ("sk-1", "u", 5, 1000), ("sk-2", "key1", None, None)]
    assert cfg.probe_interval == 1.0 and isinstance(cfg.probe_interval, float)
    assert cfg.queue_size == 7 and cfg.max_body_bytes == 1024 and cfg.down_grace == 2.5
    assert cfg.lean_transport is False and cfg.affinity is False and cfg.stall_timeout == 0.0
    # Every tuning knob of GatewayConfig is a valid [gateway] key and is applied, typed.
    changed = {name: True if v is None else (not v) if isinstance(v, bool)  # None: "auto"
               else (v + "x" if isinstance(v, str) else v + 1)
               for name, v in _tunables().items()}
    conf.write_text("[gateway]\n" + "\n".join(
        f"{name} = {_toml(v)}" for name, v in changed.items()))
    cfg = load_config(_ns(conf))
    for name, v in changed.items():
        got = getattr(cfg, name)
        assert got == v and type(got) is type(v), (name, got, v)


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f'"{v}"' if isinstance(v, str) else str(v)


def _tunables() -> dict[str, object]:
    skip = {"host", "port", "workers", "models", "redis_url", "cluster_token",
            "cluster_token_generated", "api_keys", "log_level", "model_entries", "models_dir"}
    return {f.name: f.default for f in dataclasses.fields(GatewayConfig) if f.name not in skip}


def test_models_tables_and_the_old_string_list_both_load(tmp_path: Path) -> None:
    conf = tmp_path / "corral.toml"
    conf.write_text('models_dir = "/srv/models"\n'
                    '[[models]]\nname = "chat"\npath = "/m/chat.gguf"\npin = true\n'
                    'min_replicas = 2\naliases = ["gpt-4o-mini"]\n'
                    '[[models]]\nname = "smollm2-135m"\n')
    cfg = load_config(_ns(conf))
    assert cfg.models == [] and cfg.models_dir == "/srv/models"
    chat, small = cfg.model_entries
    assert (chat.name, chat.spec, chat.pin, chat.min_replicas, chat.aliases) == (
        "chat", "/m/chat.gguf", True, 2, ("gpt-4o-mini",))
    assert (small.spec, small.pin, small.min_replicas) == ("smollm2-135m", False, 1)
    conf.write_text('models = ["smollm2-135m"]\n')  # today's form: a list of names
    assert load_config(_ns(conf)).models == ["smollm2-135m"]
    conf.write_text('[[models]]\nname = "x"\nmin_replica = 2\n')
    with pytest.raises(ConfigError) as e:
        load(str(conf))
    assert "models[0].min_replica" in str(e.value) and "min_replicas" in str(e.value)


@pytest.mark.parametrize(("flag", "want"), [([], None), (["--batch-invariant", "off"], False),
                                            (["--batch-invariant", "on"], True)])
def test_the_openvino_batch_invariance_trade_is_a_worker_flag(flag: list[str],
                                                              want: bool | None) -> None:
    """`--batch-invariant off` reaches the backend: OpenVINO's own (faster) CPU defaults."""
    pytest.importorskip("openvino_genai")
    from conftest import MODEL

    from corral.cli import build_parser, worker_config
    from worker.backends.knobs import env_flag
    from worker.backends.openvino import OpenVINOBackend
    from worker.backends.openvino_load import properties
    from worker.models import resolve
    from worker.state import make_backend

    if want is None:  # no flag: the environment's choice, else on
        want = env_flag("CORRAL_OPENVINO_BATCH_INVARIANT", True)

    a = build_parser().parse_args(["worker", "--backend", "openvino", "--model", MODEL, *flag])
    backend = make_backend(worker_config(a), resolve(MODEL)[1])
    assert isinstance(backend, OpenVINOBackend) and backend.invariant_props is want
    props = properties("CPU", None, backend.invariant_props)
    assert ("INFERENCE_PRECISION_HINT" in props) is want
