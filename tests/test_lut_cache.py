"""The colour lookup-table cache is verified, never trusted (issue 24, case 11): a truncated, foreign,
stale or tampered table, or a folder in its place, is rebuilt (said once) and the mapping stays the
reference's; an empty CITYSEG_CACHE means the default folder, never the current one."""

from __future__ import annotations

import hashlib
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from cityseg import palette as P
from cityseg.checkpoint import save_checkpoint
from cityseg.config import Config, DataConfig, ModelConfig
from cityseg.model import build_model
from cityseg.outputs import cache_dir, temp_beside
from tests.cli_process import run_cli

TWO = P.Palette(torch.tensor([[0.0, 0.0, 0.0], [255.0, 255.0, 255.0]]), torch.tensor([0, 1]), ("dark", "light"),
                torch.tensor([[0, 0, 0], [255, 255, 255]], dtype=torch.uint8))
PROBE = torch.tensor([[10, 10, 10], [200, 220, 250], [127, 127, 127], [128, 128, 128]], dtype=torch.uint8)


def two_colour_table(centers: torch.Tensor, classes: torch.Tensor, max_dist: float | None = None) -> torch.Tensor:
    """`build_lut` for TWO in numpy: the same table in a second instead of a minute on a busy machine
    (what is tested here is the cache's verification, which compares with the real reference)."""
    assert torch.equal(centers, TWO.centers) and max_dist is None
    codes = np.arange(1 << 24, dtype=np.int64)
    rgb = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255]).astype(np.int64)
    to_white = ((255 - rgb) ** 2).sum(0)
    return torch.from_numpy((to_white < (rgb**2).sum(0)).astype(np.uint8))  # ties: the lower index, dark


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CITYSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "build_lut", two_colour_table)
    P._LUTS.clear()
    yield tmp_path / "cache"
    P._LUTS.clear()


def test_the_fast_table_is_the_real_one() -> None:
    """What the fixture stands in for is exact (a sample: the real build takes a minute)."""
    codes = torch.randint(0, 1 << 24, (1 << 14,), generator=torch.Generator().manual_seed(0))
    rgb = torch.stack([codes >> 16, (codes >> 8) & 255, codes & 255], 1).to(torch.uint8)
    want = P.map_colors_reference(rgb, TWO.centers, TWO.classes).to(torch.uint8)
    assert torch.equal(two_colour_table(TWO.centers, TWO.classes)[codes], want)


def test_threads_building_the_table_at_once_all_get_it(cache: Path) -> None:
    """`train` checks files in threads, and each may be the first to need the table: they used one
    temp file (named by pid), and one renamed it away under another ("No such file or directory",
    seen in the suite now and then). Each thread now has its own temp file."""
    names: list[Path] = []
    thread = threading.Thread(target=lambda: names.append(temp_beside(table_path(cache))))
    thread.start()
    thread.join()
    assert names[0] != temp_beside(table_path(cache))
    start = threading.Barrier(6)

    def build() -> torch.Tensor:
        start.wait()
        return P._load_or_build_lut(TWO, table_path(cache))

    with ThreadPoolExecutor(6) as pool:
        tables = list(pool.map(lambda _: build(), range(6)))
    assert all(torch.equal(t, tables[0]) for t in tables) and not list(cache.glob(".*.tmp"))


def table_path(cache: Path) -> Path:
    return cache / f"lut-{TWO.key()}.bin"


def fresh_lookup(palette: P.Palette = TWO) -> torch.Tensor:
    P._LUTS.clear()
    P._SAID.clear()
    return P.map_colors_lut(PROBE, palette)


def reference() -> torch.Tensor:
    return P.map_colors_reference(PROBE, TWO.centers, TWO.classes)


def poisoned(cache: Path) -> None:
    """A table whose header and digest are right but whose classes are swapped: what someone with
    write access to a shared cache could plant."""
    table = 1 - np.frombuffer(table_path(cache).read_bytes().split(b"\n", 1)[1], dtype=np.uint8)
    table_path(cache).write_bytes(P._lut_header(TWO, table) + table.tobytes())


def stale(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same table written by another version of the code that builds it."""
    data = table_path(cache).read_bytes().split(b"\n", 1)[1]
    with monkeypatch.context() as m:
        m.setattr(P, "_builder_digest", lambda: "an older build_lut")
        table_path(cache).write_bytes(P._lut_header(TWO, np.frombuffer(data, dtype=np.uint8)) + data)


def one_entry(cache: Path) -> None:
    """One entry of 2^24 changed, the header left as it was: bit rot, or a writer cut short."""
    header, data = table_path(cache).read_bytes().split(b"\n", 1)
    table = np.frombuffer(data, dtype=np.uint8).copy()
    table[0x123456] = 1 - table[0x123456]
    table_path(cache).write_bytes(header + b"\n" + table.tobytes())


DAMAGE = {
    "one-entry": lambda cache, mp: one_entry(cache),
    "truncated": lambda cache, mp: table_path(cache).write_bytes(table_path(cache).read_bytes()[:5000]),
    "empty": lambda cache, mp: table_path(cache).write_bytes(b""),
    "old-npy-layout": lambda cache, mp: np.save(table_path(cache).open("wb"), np.zeros(1 << 24, np.uint8)),
    "poisoned": lambda cache, mp: poisoned(cache),
    "stale": stale,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_bad_cached_table_is_rebuilt_and_said_once(damage: str, cache: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert torch.equal(fresh_lookup(), reference())
    DAMAGE[damage](cache, monkeypatch)
    assert torch.equal(fresh_lookup(), reference())
    P.map_colors_lut(PROBE, TWO)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "rebuilt" in ln]
    assert len(notes) == 1 and str(table_path(cache)) in notes[0], notes
    P._LUTS.clear()
    table, problem = P._read_cached_lut(TWO, table_path(cache))  # the rebuilt file is whole again
    assert table is not None and problem == ""


def test_a_folder_in_place_of_the_table_is_left_alone(cache: Path, capsys: pytest.CaptureFixture) -> None:
    table_path(cache).mkdir(parents=True)
    assert torch.equal(fresh_lookup(), reference())
    assert table_path(cache).is_dir() and "folder is in the way" in capsys.readouterr().err


def test_an_empty_cityseg_cache_means_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CITYSEG_CACHE", "")
    monkeypatch.chdir(tmp_path)
    assert cache_dir() == tmp_path / "home" / ".cache" / "cityseg"


def test_eval_with_a_poisoned_shared_cache_scores_as_with_a_clean_one(tmp_path: Path) -> None:
    """The issue's attack through the installed command: eval's pixel accuracy must not move."""
    cfg = Config(data=DataConfig(image_size=32), model=ModelConfig(width=4, depth=2))
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict(),
                     "palette": P.cityscapes_palette().to_state()}, ckpt)
    data = tmp_path / "syn"
    assert run_cli(["synth", "--out", data, "--train", "1", "--val", "2", "--size", "32"]).returncode == 0
    env = {"CITYSEG_CACHE": str(tmp_path / "cache")}
    args = ["eval", "--ckpt", ckpt, "--data", data, "--device", "cpu", "--workers", "0"]
    clean = run_cli(args, env=env, timeout=300)
    assert clean.returncode == 0, clean.output
    path = tmp_path / "cache" / f"lut-{P.cityscapes_palette().key()}.bin"
    table = (np.frombuffer(path.read_bytes().split(b"\n", 1)[1], dtype=np.uint8) + 7) % 19
    path.write_bytes(P._lut_header(P.cityscapes_palette(), table) + table.tobytes())
    again = run_cli(args, env=env, timeout=300)
    assert again.returncode == 0, again.output
    score = re.compile(r"pixel acc \S+  mIoU \S+")
    assert score.search(again.stdout).group() == score.search(clean.stdout).group()
    assert again.stderr.count("rebuilt") == 1, again.stderr


def test_the_pinned_digests_are_the_builders_tables() -> None:
    """Each pinned digest is that of the table the builder makes (the session's table: built by the real
    `build_lut`, or read from the session cache, which a wrong pin would reject and rebuild)."""
    for key, digest in P.BUILT_TABLE_SHA256.items():
        palette = P.cityscapes_palette()
        assert palette.key() == key  # the pins are the stock palettes'
        assert hashlib.sha256(P.lookup_table(palette).numpy().tobytes()).hexdigest() == digest


@pytest.mark.parametrize("header", ["rewritten", "kept"])
def test_a_single_wrong_entry_is_rejected_whatever_the_header(header: str, tmp_path: Path) -> None:
    """The stock palette's table with one entry changed, among 2^24: with its header rewritten to
    match (what a random spot check misses most of the time) or left as it was, the cache refuses
    it, every time; the table as built is accepted."""
    palette = P.cityscapes_palette()
    table = P.lookup_table(palette).numpy()
    path = tmp_path / f"lut-{palette.key()}.bin"
    path.write_bytes(P._lut_header(palette, table) + table.tobytes())
    assert P._read_cached_lut(palette, path)[0] is not None
    for code in (0x000000, 0x80407F, 0xFFFFFF):  # a corner, the middle, the other corner
        bad = table.copy()
        bad[code] = (int(bad[code]) + 1) % palette.num_classes
        path.write_bytes(P._lut_header(palette, bad if header == "rewritten" else table) + bad.tobytes())
        loaded, problem = P._read_cached_lut(palette, path)
        assert loaded is None and problem, (hex(code), problem)
