"""The HTML report: files, escaping, self-containment, strict metrics.json, and a real render in
headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure as MplFigure

from loopscope.report import (
    Figure,
    ReportPaths,
    Section,
    Table,
    format_cell,
    to_jsonable,
    write_report,
)

PROMPTS = [
    "What is 2 + 3?",
    '<script>alert(1)</script> and <b>bold</b> & "quotes"',
    "multi\nline\n  prompt",
]
ROW_LABELS = ["block layer 0", "block layer 1", "coda <layer>"]
CHROMIUM_TIMEOUT_S = 60


def _line_figure(seed: int) -> MplFigure:
    rng = np.random.default_rng(seed)
    fig = MplFigure(figsize=(4, 2.5))
    ax = fig.add_subplot()
    ax.plot(np.arange(20), np.cumsum(rng.normal(size=20)), color="tab:blue")
    ax.set_title(f"walk {seed}")
    return fig


def _write(tmp_path: Path) -> ReportPaths:
    verdict = Table(
        title="Verdict <per layer>",
        columns=["site", "converges", "rate", "radius"],
        rows=[
            [ROW_LABELS[0], True, 0.123456, 12345.6],
            [ROW_LABELS[1], False, None, float("nan")],
            [ROW_LABELS[2], np.bool_(True), np.float32(1.5e-5), np.int64(7)],
        ],
        note="rate = fraction of tokens <= tol",
    )
    sections = [
        Section(
            title="Dynamics",
            text="First paragraph with <i>markup</i>.\n\nSecond paragraph.",
            tables=[Table("fixed points", ["layer", "dist"], [["L0", 0.5], ["L1", 2.0]])],
            figures=[Figure("dynamics-walk", "A walk <caption>", _line_figure(0))],
        ),
        Section(
            title="Stages",
            figures=[Figure("stages_walk", "Another walk", _line_figure(1))],
        ),
    ]
    metrics: dict[str, object] = {
        "rate": np.float64(0.25),
        "count": np.int64(3),
        "ok": np.bool_(True),
        "bad": float("nan"),
        "per_layer": np.array([1.0, np.inf, 3.0], dtype=np.float32),
        "nested": {"k": [np.int32(1), (2, np.float16(0.5))]},
    }
    return write_report(
        tmp_path / "rep",
        title="loopscope <report>",
        subtitle="demo & test",
        verdict=verdict,
        sections=sections,
        metrics=metrics,
        prompts=PROMPTS,
    )


def test_report_files_escaping_and_self_containment(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    html_path = paths.html
    out = tmp_path / "rep"
    assert html_path == out / "report.html" and html_path.is_file()
    names = {p.name for p in paths.figures}
    assert names == {"dynamics-walk.png", "dynamics-walk.svg", "stages_walk.png", "stages_walk.svg"}
    for p in paths.figures:
        assert p.parent == out / "figures" and p.stat().st_size > 0
    assert (out / "figures" / "stages_walk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / "figures" / "stages_walk.svg").read_bytes()
    assert not list(out.rglob("*.tmp")), "temp files must not be left behind"
    assert (out / "metrics.json").stat().st_mode & 0o777 == 0o644

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {
        "rate": 0.25,
        "count": 3,
        "ok": True,
        "bad": None,
        "per_layer": [1.0, None, 3.0],
        "nested": {"k": [1, [2, 0.5]]},
    }
    assert "NaN" not in (out / "metrics.json").read_text()

    page = html_path.read_text()
    # no network resources at all, no scripts
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>" not in page
    assert "&lt;i&gt;markup&lt;/i&gt;" in page and "<i>" not in page
    assert "A walk &lt;caption&gt;" in page and "coda &lt;layer&gt;" in page
    assert "loopscope &lt;report&gt;" in page and "demo &amp; test" in page
    # two figures embedded as PNG data URIs, identical to the PNG files
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    embedded = base64.b64decode(srcs[0].split(",", 1)[1])
    assert embedded == (out / "figures" / "dynamics-walk.png").read_bytes()
    # order: verdict, then sections in order, then prompts
    i_verdict = page.index('id="verdict"')
    assert i_verdict < page.index("<h2>Dynamics</h2>") < page.index("<h2>Stages</h2>")
    assert page.index("<h2>Stages</h2>") < page.index("<details>")
    assert '<table id="verdict" class="verdict">' in page
    assert '<th scope="col" class="num">rate</th>' in page  # numeric column right-aligned
    assert '<td class="num">\u2014</td>' in page
    # paragraphs split on blank lines; formatted cells
    assert "<p>Second paragraph.</p>" in page
    for text in ["yes", "no", "0.123", "12346", "\u2014", "NaN", "1.5e-05", ">7<"]:
        assert text in page, text


def test_format_cell_and_to_jsonable_known_values() -> None:
    assert format_cell(None) == "\u2014"
    assert format_cell(True) == "yes" and format_cell(np.bool_(False)) == "no"
    assert format_cell(3) == "3" and format_cell(np.int64(-12)) == "-12"
    assert format_cell(0.123456) == "0.123" and format_cell(2.0) == "2"
    assert format_cell(-0.0) == "0" and format_cell(1234.4) == "1234"
    assert format_cell(123456.0) == "1.23e+05" and format_cell(0.00012345) == "0.000123"
    assert format_cell(float("inf")) == "\u221e" and format_cell(float("nan")) == "NaN"
    assert format_cell("<x>") == "<x>"  # escaping happens at render time
    with pytest.raises(TypeError, match="format it to a string"):
        format_cell([1, 2])

    assert to_jsonable({1: np.float32(np.nan), "a": np.arange(3)}) == {"1": None, "a": [0, 1, 2]}
    out = to_jsonable(np.float64(0.5))
    assert out == 0.5 and type(out) is float
    with pytest.raises(TypeError, match=r"metrics\['x'\]\[1\]"):
        to_jsonable({"x": [1, object()]})


def test_bad_input_fails_with_clear_errors(tmp_path: Path) -> None:
    ok = Table("v", ["site", "x"], [["a", 1.0]])
    fig = Figure("bad name!", "c", _line_figure(2))
    with pytest.raises(ValueError, match="file-safe slug"):
        write_report(
            tmp_path,
            title="t",
            subtitle="",
            verdict=ok,
            sections=[Section("s", figures=[fig])],
            metrics={},
        )
    dup = [Figure("f", "c", _line_figure(3)), Figure("f", "c", _line_figure(4))]
    with pytest.raises(ValueError, match="used twice"):
        write_report(
            tmp_path,
            title="t",
            subtitle="",
            verdict=ok,
            sections=[Section("s", figures=dup)],
            metrics={},
        )
    short = Table("v", ["site", "x"], [["a"]])
    with pytest.raises(ValueError, match="row 0 has 1 cells but 2 columns"):
        write_report(tmp_path, title="t", subtitle="", verdict=short, sections=[], metrics={})
    with pytest.raises(ValueError, match="unknown figure format"):
        write_report(
            tmp_path,
            title="t",
            subtitle="",
            verdict=ok,
            sections=[],
            metrics={},
            formats=("png", "gif"),
        )
    assert not (tmp_path / "report.html").exists()


def test_pyplot_figures_are_closed(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    num = fig.number
    write_report(
        tmp_path,
        title="t",
        subtitle="s",
        verdict=Table("v", ["site"], [["a"]]),
        sections=[Section("s", figures=[Figure("p", "c", fig)])],
        metrics={},
    )
    assert not plt.fignum_exists(num)
    assert (tmp_path / "figures" / "p.png").is_file()


class _VerdictRows(HTMLParser):
    """Collects the text of row headers inside <table id="verdict">."""

    def __init__(self) -> None:
        super().__init__()
        self.in_verdict = False
        self.in_row_header = False
        self.labels: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id") == "verdict":
            self.in_verdict = True
        elif self.in_verdict and tag == "th" and a.get("scope") == "row":
            self.in_row_header = True
            self.labels.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_verdict = False
        elif tag == "th":
            self.in_row_header = False

    def handle_data(self, data: str) -> None:
        if self.in_row_header:
            self.labels[-1] += data


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, timeout=CHROMIUM_TIMEOUT_S, check=False)


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("no `chromium` binary on PATH (install it: apt-get install -y chromium)")
    url = _write(tmp_path).html.resolve().as_uri()

    shot = tmp_path / "shot.png"
    res = _chromium(binary, tmp_path / "profile1", f"--screenshot={shot}",
                    "--window-size=1280,2000", url)  # fmt: skip
    assert shot.is_file(), f"no screenshot; chromium rc={res.returncode}: {res.stderr[-2000:]!r}"
    img = np.asarray(matplotlib.image.imread(str(shot)))[..., :3]
    assert img.shape[:2] == (2000, 1280)
    background = img[5, 5]  # top-left margin
    differs = np.any(np.abs(img - background) > 0.02, axis=-1).mean()
    assert float(img.std()) > 0.05, f"screenshot looks blank (std {img.std():.4f})"
    assert differs > 0.02, f"only {differs:.1%} of pixels differ from the background"

    res = _chromium(binary, tmp_path / "profile2", "--dump-dom", url)
    dom = res.stdout.decode("utf-8")
    assert res.returncode == 0, f"chromium --dump-dom rc={res.returncode}: {res.stderr[-2000:]!r}"
    assert 'id="verdict"' in dom
    parser = _VerdictRows()
    parser.feed(dom)
    assert parser.labels == ROW_LABELS
    assert "<script" not in dom.lower()  # the escaped prompt stayed text after parsing
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
