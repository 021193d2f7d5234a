"""flowers.cli: option defaults come from the settings dataclasses; shared option parsing."""

import dataclasses

import click
import pytest
from click.testing import CliRunner

from flowers.bench import BenchSettings
from flowers.cli import cli
from flowers.cli.options import default, levels_text, parse_sizes
from flowers.cli.serving import runtime_names_help
from flowers.errors import FlowersError
from flowers.serve.settings import ServeSettings


def option_defaults(command: click.Command) -> dict[str, object]:
    return {p.name: p.default for p in command.params if isinstance(p, click.Option)}


def test_bench_and_serve_options_default_to_their_settings_fields():
    bench = option_defaults(cli.commands["bench"])
    for field in ("image_size", "batch_size", "steps", "rounds", "warmup", "e2e_epochs",
                  "e2e_images_per_class", "backbone"):
        assert bench[field] == default(BenchSettings, field)
    assert bench["backends"] == ",".join(BenchSettings.backends)
    serve = option_defaults(cli.commands["serve"])
    for field in ("max_batch", "max_wait_ms", "max_queue", "max_instances"):
        assert serve[field] == default(ServeSettings, field)


def test_default_names_a_missing_field_or_default():
    @dataclasses.dataclass
    class Settings:
        needed: int
        given: int = 3

    assert default(Settings, "given") == 3
    with pytest.raises(ValueError, match="Settings.needed has no default"):
        default(Settings, "needed")
    with pytest.raises(ValueError, match="has no field 'other'"):
        default(Settings, "other")


def test_levels_and_sizes_round_trip():
    assert levels_text((1, 4, 16)) == "1,4,16"
    assert parse_sizes(" 32, 64,224 ") == (32, 64, 224) and parse_sizes("") == ()
    with pytest.raises(FlowersError, match="'6x' is not a whole number"):
        parse_sizes("32,6x")


def test_bench_serve_runtimes_follow_the_serve_preference():
    assert runtime_names_help() == ["onnx", "savedmodel", "tflite", "keras-torch", "keras-tensorflow",
                                    "keras-jax", "tfjs"]


def test_every_command_family_is_in_the_group():
    assert set(cli.commands) == {"info", "train", "evaluate", "compare", "parity", "export", "exports",
                                 "predict", "bench", "serve", "loadtest", "bench-serve"}
    result = CliRunner().invoke(cli, ["exports", "formats"])
    assert result.exit_code == 0 and result.output.splitlines()[0].split()[:3] == ["format", "path",
                                                                                  "written"]
