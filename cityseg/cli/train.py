"""`cityseg-fast train` and `cityseg-fast profile`: options -> Config -> the training engine.

    cityseg-fast train                      # synthetic city data, CPU-sized preset, ~5 min on 2 cores
    cityseg-fast train --data DIR           # Kaggle pairs: DIR/train/*.jpg, DIR/val/*.jpg
    cityseg-fast train --config run.toml --lr 1e-3
    cityseg-fast train --resume runs/X --epochs 20
    cityseg-fast profile --steps 20 --data DIR

The command is a thin shell. Its flags are made from the settings' declarations (cityseg/config.py:
flag, help, default, choices; `setting_parameters`), plus its own few (`command_parameters`). Every
option defaults to "unset"; what the user typed goes, by config key, to `cityseg.resolve.resolve_run`,
which makes the run's config (defaults, presets, --init-from, --config, options, --set, --resume
rules, checks). Nothing here imports torch: `--help` answers at once.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from cityseg.cli.choices import choice_enum
from cityseg.cli.common import app, console, err_console, fail, given_options
from cityseg.config import AMP_TO_PRECISION, PRESETS, SETTINGS, Config, field_types, get_value
from cityseg.errors import OptionError
from cityseg.options import OPTION_KEYS, check_options
from cityseg.settings import OUTPUT, SPEED, TRAIN, Setting

DEFAULTS = Config()
# Where a preset changes a default, the help says so: "(default 32; 16 for synthetic data on a CPU)".
PRESET_WHEN = {"real-data": "with --data", "cpu-synthetic": "for synthetic data on a CPU"}
# The `train` options that are not run settings: how to start, where the settings come from.
COMMAND_ONLY = ("amp", "nproc", "set_values", "config", "print_config_only", "smoke")


def shown_default(key: str, setting: Setting) -> str:
    """The default as `-h` and the README say it."""
    if setting.shown is not None:
        return setting.shown
    value = get_value(DEFAULTS, key)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def default_with_presets(key: str, setting: Setting) -> str:
    """"32; 16 for synthetic data on a CPU": the default, then what the presets make of it."""
    notes = [f"{PRESETS[name][key]} {when}" for name, when in PRESET_WHEN.items() if key in PRESETS[name]]
    return "; ".join([shown_default(key, setting), *notes])


def help_text(key: str, setting: Setting) -> str:
    """A setting's help with its default and the presets' values, all from its declaration."""
    resumable = ", ".join(s.option for s in SETTINGS.values() if s.resume)
    text = setting.help.format(resumable=resumable)  # --resume's help lists what it lets change
    switch_off = setting.flag and "/" not in setting.flag and field_types()[key] is bool
    if switch_off or (get_value(DEFAULTS, key) is None and setting.shown is None):
        return text  # off unless given, or unset unless given: no default to tell
    return f"{text.rstrip('.')} (default {default_with_presets(key, setting)})."


def option_type(key: str, setting: Setting) -> Any:
    """What typer parses the flag as: the choices as an enum, text for values parsed later
    (durations, LO,HI, `auto`), a Path for folders and files, else the field's own type."""
    if setting.choices is not None:
        return choice_enum(setting.name.title().replace("_", ""), setting.choices)
    if setting.parse is not None:
        return str
    if setting.path:
        return Path
    hint = field_types()[key]
    return next((t for t in (bool, int, float, str) if hint is t or t in getattr(hint, "__args__", ())), str)


def setting_parameters() -> list[inspect.Parameter]:
    """One keyword parameter of `train` per setting with a flag, declared from its Setting alone."""
    params = []
    for key, setting in SETTINGS.items():
        if not setting.name:
            continue
        kind = option_type(key, setting)
        switch_off = kind is bool and "/" not in setting.flag  # --skip-bad: given or not
        option = typer.Option(setting.flag, help=help_text(key, setting), rich_help_panel=setting.panel)
        params.append(inspect.Parameter(
            setting.name, inspect.Parameter.KEYWORD_ONLY, default=False if switch_off else None,
            annotation=Annotated[kind if switch_off else kind | None, option]))
    return params


def command_parameters() -> list[inspect.Parameter]:
    """`train`'s own options: an older spelling, the launcher, and where settings come from."""
    def option(name: str, kind: Any, default: Any, *decls: str, help: str, panel: str = OUTPUT,  # noqa: A002
               **extra: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[
            kind, typer.Option(*decls, help=help, rich_help_panel=panel, **extra)])

    return [
        option("amp", bool | None, None, "--amp/--no-amp", panel=SPEED,
               help="Older spellings of --precision bf16-mixed / 32."),
        option("nproc", int, 1, "--nproc", panel=SPEED, show_default=False, help=(  # the default inline, as others
            "Processes (GPUs) on this machine, launched with torchrun (DDP). Several machines: see README "
            "(default 1).")),
        option("set_values", list[str] | None, None, "--set", panel=TRAIN, metavar="<key=value>", help=(
            "Any config key, e.g. --set train.min_lr_ratio=0.05 (repeatable; checked like a config file).")),
        option("config", Path | None, None, "--config", help=(
            "Options from a TOML, YAML or JSON file ([data], [model], [train] sections, as --print-config "
            "prints); options typed here win.")),
        option("print_config_only", bool, False, "--print-config",
               help="Print the resolved config as YAML (a --config file) and exit."),
        option("smoke", bool, False, "--smoke", help="A few steps on a tiny set: checks the install."),
    ]


def config_values(given: dict[str, Any]) -> dict[str, Any]:
    """The typed settings as {config key: value}: enums to strings, text parsed (`20m` -> 1200.0) and
    checked against its option's rule (one line naming the flag as typed), paths made absolute (eval
    and --resume from elsewhere find the same place)."""
    values: dict[str, Any] = {}
    for name, value in given.items():
        if name in COMMAND_ONLY and name != "amp":
            continue
        if name == "amp":  # the older switch: --amp is bf16-mixed, --no-amp is 32
            values["train.precision"] = AMP_TO_PRECISION[value]
            continue
        key, *also = OPTION_KEYS[name]
        setting = SETTINGS[key]
        if isinstance(value, Enum):
            value = value.value
        if setting.parse is not None and isinstance(value, str):
            value = setting.parse(value)
        check_options({name: value})
        if setting.path:
            value = str(Path(value).absolute())
        for k in (key, *also):
            values[k] = value
    return values


def parse_set_values(items: list[str]) -> dict[str, Any]:
    """`--set train.min_lr_ratio=0.05 --set data.augment.scale=[0.5,2]` -> {config key: value}; each
    value is read as YAML (numbers, true/false, null, [lists]); keys and types are checked later by
    the same rules as a config file's."""
    import yaml

    from cityseg.options import load_yaml

    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--set {item}: expected KEY=VALUE with a config key, e.g. train.min_lr_ratio=0.05")
        try:
            values[key.strip()] = load_yaml(text) if text.strip() else None
        except (yaml.YAMLError, OptionError):
            raise OptionError(f"--set {item}: the value is not a number, true/false, null, text or [list]") from None
    return values


def resolve_given(values: dict[str, Any], given: dict[str, Any]) -> Any:
    """The typed settings (`config_values`) and the command's own options -> `cityseg.resolve.resolve_run`
    (the one place a run's config is made)."""
    from cityseg.resolve import resolve_run

    run = resolve_run(values, config_file=given.get("config"), smoke=bool(given.get("smoke")),
                      set_values=parse_set_values(given.get("set_values") or []))
    for note in run.notes:
        err_console.print(note, soft_wrap=True)
    return run


# Keys a config file does not carry: the run folder and --resume are command-line choices.
NOT_IN_FILE = ("train.out", "train.resume")
SYNTHETIC_ONLY = ("data.synth_train", "data.synth_val", "data.synth_seed")  # unused with --data


def config_text(cfg: Config, derived: dict[str, Any] | None = None) -> str:
    """The config as YAML that `--config` reads back to the same config: sections, no keys that do
    not apply (the run folder, --resume, the synthetic set's sizes when a data folder is given); then
    `derived`, how auto's values were found, as config.json's "resolved" section (not read back)."""
    import yaml

    drop = set(NOT_IN_FILE) | (set(SYNTHETIC_ONLY) if cfg.data.data_dir is not None else set())
    tree = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists: plain YAML
    for key in drop:
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node[section]
        node.pop(leaf, None)
    if derived:
        tree["resolved"] = derived
    header = "# cityseg-fast train --config FILE reads this back (the run folder, --out, is not part of it)\n"
    return header + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)  # block style throughout


def options_table() -> str:
    """README's table of every `train` setting, from the same declarations as the flags (a test
    keeps the README's copy equal to this)."""
    rows = ["| flag | config key | default | `--resume` may change it |", "|---|---|---|---|"]
    for key, setting in SETTINGS.items():
        name = f"`{setting.flag}`" if setting.flag else "(`--set`, config file)"
        default = default_with_presets(key, setting).replace("|", r"\|")  # a `|` would end the cell
        rows.append(f"| {name} | `{key}` | {default} | {'yes' if setting.resume else ''} |")
    return "\n".join(rows) + "\n"


def train(ctx: typer.Context, **options: Any) -> None:  # the options: setting_parameters, command_parameters
    """Train a U-Net and write a run folder (config, metrics, checkpoints, curves, samples)."""
    given = given_options(ctx)
    given.pop("print_config_only", None)
    check_options({"nproc": options["nproc"]})
    values = config_values(given)  # every typed value parsed and in range before torchrun starts ranks
    if options["nproc"] > 1:
        from cityseg.resolve import check_ddp_compile_mode

        check_ddp_compile_mode(values.get("train.compile_mode"), options["nproc"])
        launch_torchrun(options["nproc"])
    console.quiet = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 speaks for all
    if not options["print_config_only"]:  # the first line within a second: PyTorch alone takes 2-15 s to load
        console.print("start-up: loading PyTorch and the training code ...", soft_wrap=True)
    run = resolve_given(values, given)
    if options["print_config_only"]:
        # Not through Rich: exactly the file's text, never wrapped.
        sys.stdout.write(config_text(run.config, run.derived))
        return
    summary = run_training(run)
    from cityseg.telemetry import fmt

    final = summary["final"]
    console.print(Text.assemble(
        ("done", "bold green"),
        f": val pixel acc {final['pixel_acc']:.4f}, mIoU {fmt(final['miou'], '.4f')}, "
        f"{fmt(summary['images_per_s'])} img/s in steps ({fmt(summary['wall_images_per_s'])} img/s of wall time), "
        f"run folder {summary['run_dir']}"), soft_wrap=True)
    console.print(
        "time: " + "  ".join(f"{k[:-2]} {summary[k]:.1f}s" for k in
                             ("startup_s", "warmup_s", "train_s", "val_s", "checkpoint_s", "other_s", "elapsed_s"))
        + f"  (from the {summary['time_zero']})", soft_wrap=True)


train.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
    *setting_parameters(), *command_parameters()])
app.command()(train)


def run_training(resolved: Any, on_step: Any = None) -> dict:
    """Train a resolved run; a signal ends the process with 130 (SIGINT) or 128 + its number, after saving."""
    import signal

    from cityseg.errors import InterruptedNow
    from cityseg.training import EXIT_INTERRUPTED, Interrupted
    from cityseg.training import train as run

    try:
        return run(resolved, console, on_step=on_step)
    except KeyboardInterrupt as e:  # before training started, or a second signal: nothing more to save
        run_dir = getattr(e, "run_dir", None)
        if run_dir is not None and (Path(run_dir) / "checkpoints" / "last.pt").is_file():
            err_console.print(f"interrupted; resume from the last saved epoch with: cityseg-fast train --resume "
                              f"{run_dir}", soft_wrap=True)
        else:
            err_console.print("interrupted")
        raise typer.Exit(e.exit_code if isinstance(e, InterruptedNow) else EXIT_INTERRUPTED) from None
    except Interrupted as e:
        err_console.print(str(e), soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED if e.signum == signal.SIGINT else 128 + e.signum) from None


def launch_torchrun(nproc: int) -> None:
    """Re-run this very command under torchrun with `nproc` processes (and no --nproc)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    launch = ["--standalone", f"--nproc-per-node={nproc}", "-m", "cityseg", *args]
    console.print(f"launching: torchrun {' '.join(launch)}", soft_wrap=True)
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as e:  # the workers printed their own one-line errors
        codes = [f.exitcode for f in e.failures.values() if f.exitcode > 0]
        raise typer.Exit(codes[0] if codes else 1) from None
    raise typer.Exit(0)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def profile(
    ctx: typer.Context,
    steps: Annotated[int, typer.Option(help="Training steps recorded (after 1 skipped and 2 warm-up steps).")] = 10,
    out: Annotated[Path, typer.Option(help="Folder for trace.json, top_ops.txt, gpu_timeline.png and the run "
                                      "(OUT/run: a new run folder).")] = Path("profile"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace trace.json, top_ops.txt and "
                                            "gpu_timeline.png if OUT holds them.")] = False,
) -> None:
    """Profile training steps with torch.profiler. Any `train` option may follow, e.g.
    `cityseg-fast profile --steps 20 --data DIR --batch-size 32`."""
    check_options({"steps": steps})
    train_command = typer.main.get_command(app).get_command(ctx, "train")
    try:
        train_ctx = train_command.make_context("train", list(ctx.args))
    except typer.TyperException as e:  # an unknown or malformed train option
        fail(f"profile: {e.format_message() if hasattr(e, 'format_message') else e}")
    given = given_options(train_ctx)
    if "resume" in given or "out" in given:
        fail("profile: --resume and --out are not train options here (the run goes to OUT/run)")
    train_given = {**given, "out": out / "run"}
    run = resolve_given(config_values(train_given), train_given)
    from cityseg.profiling import profile_training

    profile_training(run, steps, out, console, run_training, overwrite=overwrite)

