"""The run config: defaults, YAML + overrides, and errors that name the key before anything runs."""

from __future__ import annotations

import pytest

from erpo_jax.cli import main
from erpo_jax.train import ConfigError, RunConfig, config_diff, config_to_dict, load_config
from erpo_jax.train._config import MeshConfig, config_to_yaml


def test_defaults_are_the_toy_erpo_job():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.loss.name == "erpo" and cfg.data.task == "countdown"
    assert cfg.model.checkpoint == "toy"
    assert cfg.loss.needs_reference  # ERPO's progress term (eta > 0) needs the reference


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nloss:\n  name: grpo\n  kl_coef: 0.04\nrollout:\n  group_size: 4\n")
    cfg = load_config(path, ["rollout.group_size=6", "mesh.data=2", "seed=3"])
    assert (cfg.steps, cfg.seed, cfg.loss.name, cfg.loss.kl_coef) == (7, 3, "grpo", 0.04)
    assert cfg.rollout.group_size == 6 and cfg.mesh.data == 2
    assert cfg.loss.needs_reference  # kl_coef > 0
    # The resolved YAML loads back to the same config.
    again = tmp_path / "resolved.yaml"
    again.write_text(config_to_yaml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["loss.nmae=grpo"], r"unknown key 'loss.nmae'; did you mean 'loss.name'\?"),
        (["stpes=3"], r"unknown key 'stpes'; did you mean 'steps'\?"),
        (["steps=abc"], r"config key steps: .*abc"),
        (["loss.name=ppo"], r"loss.name='ppo'.*allowed values are grpo, dr_grpo, dapo, erpo"),
        (["loss.name=arca"], r"loss.name=arca needs LoRA.*model.lora_rank"),
        (["rollout.reft=true", "rollout.group_size=6"], r"rollout.reft_k=4.*divide.*group_size=6"),
        (["rollout.group_size=1"], r"rollout.group_size=1.*>= 2"),
        (["rollout.max_prompt_tokens=0"], r"rollout.max_prompt_tokens=0.*null or >= 1"),
        (["rollout.stop_check_every=0"], r"rollout.stop_check_every=0"),
        (["rollout.decode_phases=0"], r"rollout.decode_phases=0.*null \(auto\) or an int >= 1"),
        (["train.micro_batches=3"], r"train.micro_batches=3.*divide the 16 groups"),
        (["train.micro_batches=0"], r"train.micro_batches=0.*null \(auto\) or an int >= 1"),
        (["train.length_buckets=0"], r"train.length_buckets=0.*>= 1"),
        (["train.length_buckets=49"], r"train.length_buckets=49.*1..rollout.max_new_tokens=48"),
        (["model.dtype=int8"], r"model.dtype='int8'.*float32, bfloat16, float16"),
        (["data.source=file"], r"data.path=None.*needs a file"),
        (["mesh.data=-1", "mesh.fsdp=-1"], r"at most one of mesh.data, mesh.fsdp"),
        (["steps"], r"override 'steps' is not key=value"),
        (["profile_step=500"], r"profile_step=500.*steps=100"),
    ],
)
def test_bad_configs_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_mesh_shape_must_fit_the_devices():
    assert MeshConfig().shape(8) == (8, 1, 1)
    assert MeshConfig(data=2, fsdp=-1).shape(8) == (2, 4, 1)
    assert MeshConfig(data=1, fsdp=4, tensor=2).shape(8) == (1, 4, 2)
    with pytest.raises(ConfigError, match="does not divide the 8 devices"):
        MeshConfig(data=3, fsdp=-1).shape(8)
    with pytest.raises(ConfigError, match="product must equal the device count"):
        MeshConfig(data=2, fsdp=2).shape(8)


def test_config_diff_ignores_bookkeeping_keys():
    a = config_to_dict(load_config(None, ["steps=10"]))
    b = config_to_dict(
        load_config(
            None,
            [
                "steps=20",
                "checkpoint_every=5",
                "compilation_cache_dir=null",
                "train.length_buckets=1",
                # a checkpoint from before decode_phases defaulted to null (auto)
                "rollout.decode_phases=1",
                # ... and from before micro_batches did
                "train.micro_batches=1",
            ],
        )
    )
    assert config_diff(a, b) == []
    c = config_to_dict(load_config(None, ["loss.eta=0.5", "seed=1"]))
    assert config_diff(a, c) == [
        "loss.eta (checkpoint: 0.2, now: 0.5)",
        "seed (checkpoint: 0, now: 1)",
    ]


def test_resume_accepts_a_key_added_since_the_checkpoint_at_its_default():
    """A checkpoint written before rollout.stop_check_every existed resumes when
    the key has its default (the behaviour the run had), not when it differs."""
    defaults = config_to_dict(RunConfig())
    saved = config_to_dict(load_config(None, ["seed=2"]))
    del saved["rollout"]["stop_check_every"]
    now = config_to_dict(load_config(None, ["seed=2"]))
    assert config_diff(saved, now, defaults=defaults) == []
    changed = config_to_dict(load_config(None, ["seed=2", "rollout.stop_check_every=4"]))
    assert config_diff(saved, changed, defaults=defaults) == [
        "rollout.stop_check_every (checkpoint: None, now: 4)"
    ]
    # the key reaches the sampler
    from erpo_jax.train._loop import _sampling_options

    assert (
        _sampling_options(load_config(None, ["rollout.stop_check_every=4"]), ()).stop_check_every
        == 4
    )
    assert _sampling_options(load_config(None, ["rollout.decode_phases=4"]), ()).decode_phases == 4
    # null (the default) is the sampler's auto rule, passed on as None.
    assert load_config(None, []).rollout.decode_phases is None
    auto = load_config(None, ["rollout.decode_phases=null"])
    assert _sampling_options(auto, ()).decode_phases is None
    # rollout.gather_params: null (auto) by default, a bool passed on as given.
    assert _sampling_options(auto, ()).gather_params is None
    for value in (True, False):
        cfg = load_config(None, [f"rollout.gather_params={str(value).lower()}"])
        assert _sampling_options(cfg, ()).gather_params is value
    # With stop strings too (each host check's chunk runs the phases it overlaps).
    both = load_config(None, ["rollout.decode_phases=4", "rollout.stop_strings=[END]"])
    assert _sampling_options(both, ()).decode_phases == 4
    # without the defaults, a missing key is a difference
    assert config_diff(saved, now) == ["rollout.stop_check_every (checkpoint: None, now: 16)"]


def test_cli_rejects_bad_config_with_exit_2(capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "r"), "loss.nmae=grpo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("erpo-jax train: config: unknown key 'loss.nmae'")
    assert "did you mean 'loss.name'" in err
    assert not (tmp_path / "r").exists()  # rejected before anything was written
    assert main(["train", "--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # --dtype is model.dtype: checked against the allowed compute dtypes
    assert main(["train", "--out", str(tmp_path / "r"), "--dtype", "int8"]) == 2
    assert "model.dtype='int8'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


class _Stop(Exception):
    """Raised by a stand-in to end a CLI run at the call under test."""


def test_cli_train_dtype_sets_model_dtype(monkeypatch, tmp_path):
    import erpo_jax.train

    runs = []

    def train(config, *, out, resume):
        runs.append(config)

    monkeypatch.setattr(erpo_jax.train, "train", train)
    out = str(tmp_path / "r")
    assert main(["train", "--out", out, "--dtype", "bfloat16", "steps=3"]) == 0
    assert main(["train", "--out", out, "steps=3"]) == 0
    assert [(c.model.dtype, c.steps) for c in runs] == [("bfloat16", 3), ("float32", 3)]


def test_cli_eval_dtype_reaches_the_checkpoint_loader(monkeypatch, tmp_path, capsys):
    import jax.numpy as jnp

    import erpo_jax.models
    import erpo_jax.train

    loads = []

    def load_hf_checkpoint(path, **kw):
        loads.append(kw)
        raise _Stop

    def build_toy_base_model(*args, **kw):
        raise _Stop

    monkeypatch.setattr(erpo_jax.models, "load_hf_checkpoint", load_hf_checkpoint)
    monkeypatch.setattr(erpo_jax.train, "build_toy_base_model", build_toy_base_model)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    argv = ["eval", "--out", str(tmp_path / "never"), "--compilation-cache-dir", ""]
    with pytest.raises(_Stop):
        main([*argv, "--checkpoint", str(checkpoint), "--dtype", "bfloat16"])
    with pytest.raises(_Stop):
        main([*argv, "--checkpoint", str(checkpoint)])
    assert [jnp.dtype(kw["dtype"]) for kw in loads] == [jnp.bfloat16, jnp.float32]

    # A dtype outside the compute dtypes is a usage error naming the flag and the
    # allowed values, raised before any checkpoint is loaded or the toy model built.
    for where in (["--checkpoint", str(checkpoint)], []):
        assert main([*argv, *where, "--dtype", "int8"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("erpo-jax eval: --dtype 'int8'"), err
        assert "float32, bfloat16, float16" in err
    assert len(loads) == 2 and not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("mesh_shape", "overrides", "pattern"),
    [
        # 2 processes but every row on one shard: a process could not feed its own rows
        ({"data": 1, "fsdp": 1, "tensor": 2}, [], r"mesh.data x mesh.fsdp = 1 must be a multiple"),
        # 3 x 4 = 12 rollout rows over 8 row shards
        (
            {"data": 2, "fsdp": 4, "tensor": 1},
            ["rollout.prompts_per_step=3", "rollout.group_size=4"],
            r"rollout.prompts_per_step x rollout.group_size = 12 rows",
        ),
        # evaluation: 3 prompts x 1 greedy sample x 2 processes over 4 shards
        (
            {"data": 4, "fsdp": 1, "tensor": 1},
            ["eval.batch_size=3", "rollout.prompts_per_step=4"],
            r"eval.batch_size=3: 3 prompts x 1 samples x 2 processes",
        ),
    ],
)
def test_multihost_layouts_that_cannot_feed_per_process_rows(
    monkeypatch, mesh_shape, overrides, pattern
):
    import types

    import jax

    from erpo_jax.train._loop import _check_multihost

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=pattern):
        _check_multihost(cfg, types.SimpleNamespace(shape=mesh_shape), 64)


def test_multihost_layout_that_divides_passes(monkeypatch):
    import types

    import jax

    from erpo_jax.train._loop import _check_multihost

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    cfg = load_config(None, ["rollout.prompts_per_step=4", "eval.batch_size=4"])
    _check_multihost(cfg, types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 1}), 64)


def test_compilation_cache_dir(tmp_path):
    """The trainer points JAX's persistent cache at compilation_cache_dir (a
    fresh process, as the test session sets its own cache): a program
    compiled there is stored; an unusable path is a ConfigError naming the
    key (exit 2 naming the flag for `erpo-jax eval`); a cache configured
    before (JAX_COMPILATION_CACHE_DIR) is kept."""
    import os
    import subprocess
    import sys
    import textwrap

    assert RunConfig().compilation_cache_dir == "~/.cache/erpo_jax/xla"
    assert load_config(None, ["compilation_cache_dir=null"]).compilation_cache_dir is None
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    script = textwrap.dedent(
        f"""
        import contextlib, io
        import jax, jax.numpy as jnp
        from erpo_jax.cli import main
        from erpo_jax.train import ConfigError
        from erpo_jax.train._loop import use_compilation_cache
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["eval", "--compilation-cache-dir", {str(blocker / "cache")!r}])
        assert rc == 2 and "--compilation-cache-dir=" in err.getvalue(), err.getvalue()
        try:
            use_compilation_cache({str(blocker / "cache")!r})
        except ConfigError as e:
            assert "compilation_cache_dir=" in str(e) and "null" in str(e), e
        else:
            raise AssertionError("no error for a path under a file")
        assert use_compilation_cache(None) is None
        got = use_compilation_cache({str(tmp_path / "cache")!r})
        assert got == {str(tmp_path / "cache")!r}, got
        jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
        assert use_compilation_cache("/elsewhere") == got  # the cache in use is kept
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # store even this tiny program
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]
    assert any((tmp_path / "cache").iterdir())  # the compiled program was stored


def test_cli_parser_does_not_load_the_trainer():
    """`erpo-jax --help` and argument errors stay instant: building the parser
    (which shows the compilation-cache default) imports neither the trainer
    (orbax, optax) nor JAX. A fresh process, since this one has both loaded."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from erpo_jax.cli import build_parser\n"
        "p = build_parser()\n"
        "ns = p.parse_args(['eval'])\n"
        "print(ns.compilation_cache_dir)\n"
        "print(sorted(m for m in ('erpo_jax.train', 'jax', 'orbax') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == [RunConfig().compilation_cache_dir, "[]"], out.stdout
