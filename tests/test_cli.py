"""The command line's engine flags come from `EngineConfig`'s fields: every option has its flag
in `generate` and `serve`, with the field's type, choices and help, and a flag left out keeps the
config's default."""

from __future__ import annotations

import pytest

from infinite_llm.config import EngineConfig
from infinite_llm.entrypoints import cli

# A value for every option, none of them its default, so each flag is shown to reach its field.
NON_DEFAULT = dict(
    model="some/folder", dtype="float16", device="cpu", seed=5, load_format="dummy",
    max_model_len=99, block_size=32, num_kv_blocks=7, kv_cache_fraction=0.25,
    max_num_batched_tokens=100, max_num_seqs=3, enforce_eager=True, async_scheduling=False,
    num_instances=2, kv_mode="static", worker_timeout_s=9.5, data_backend="gloo",
)


def _argv(options: dict[str, object]) -> list[str]:
    argv = []
    for name, value in options.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def test_every_option_is_a_flag_that_reaches_its_field() -> None:
    assert set(NON_DEFAULT) == {f.name for f in EngineConfig.option_fields()}
    defaults = EngineConfig().options()
    assert all(NON_DEFAULT[name] != defaults[name] for name in NON_DEFAULT)
    args = cli._parser().parse_args(["serve", *_argv(NON_DEFAULT)])
    assert cli._engine_options(args) == NON_DEFAULT
    assert EngineConfig.from_options(**cli._engine_options(args)).options() == NON_DEFAULT
    generate = {k: v for k, v in NON_DEFAULT.items() if k != "seed"}
    args = cli._parser().parse_args(["generate", "Hi", *_argv(generate), "--seed", "11"])
    assert cli._engine_options(args) == generate
    assert args.sampling_seed == 11  # generate's --seed is the request's sampling seed


@pytest.mark.parametrize("command", [["serve"], ["generate", "Hi"]])
def test_flags_left_out_keep_the_config_defaults(command: list[str]) -> None:
    args = cli._parser().parse_args(command)
    assert cli._engine_options(args) == {}
    assert EngineConfig.from_options(**cli._engine_options(args)) == EngineConfig()


@pytest.mark.parametrize("flags", [["--kv-mode", "mirrored"], ["--load-format", "random"],
                                   ["--dtype", "int8"], ["--block-size", "16.5"],
                                   ["--kv-cache-fraction", "half"]])
def test_a_flag_outside_its_type_or_choices_is_refused(flags: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["serve", *flags])
    assert exit_.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_help_is_the_fields_help_with_its_default(capsys) -> None:
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in EngineConfig.option_fields():
        assert " ".join(f.metadata["help"].split()) in text
    assert "--block-size BLOCK_SIZE tokens per KV block (a power of two) (default: 16)" in text
    assert "--load-format {auto,dummy}" in text
    assert "(default: --async-scheduling)" in text and "(default: --no-enforce-eager)" in text


def test_option_fields_are_unique_and_typed() -> None:
    """Flag names are the field names: a name in two parts would be one flag for two fields."""
    names = [f.name for f in EngineConfig.option_fields()]
    assert len(names) == len(set(names))
    kinds = {f.name: cli._flag_type(f) for f in EngineConfig.option_fields()}
    assert (kinds["model"], kinds["max_model_len"], kinds["kv_cache_fraction"],
            kinds["enforce_eager"]) == (str, int, float, bool)
