"""`surprisal`, `generate` and `labels`: read a language-model run's models on text, and a concept's weak labels."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from anchoring import runs
from anchoring.cli.common import app, err, fail, open_run, out
from anchoring.errors import AnchoringError


def _lm_models(command: str, run_dir: Path, arm: str | None, seed: int | None, edit: str | None):
    """(run, the arm's model, the model under `edit` or None) of a language-model run, or one line why not."""
    run = open_run(run_dir)  # reading only: a run still in training can be looked at
    if run.kind != "lm":
        fail(f"`{command}` applies to language-model runs, not {run.kind!r} runs")
    try:
        model = run.model(arm, seed)
        if edit is None:
            return run, model, None
        from anchoring.kinds.lm.edits import edited

        made = runs.edit_record(run.path)
        if made is not None:  # e.g. --edit delete on a deleted run: the two columns would be the same, unexplained
            how = made.get("method", "an edit")
            err.print(f"note: {str(run.path)!r} was written by `anchoring delete` ({how}); --edit {edit} acts on "
                      f"the edited weights", markup=False, highlight=False, soft_wrap=True)
        name = next(iter(run.arms)) if arm is None else arm
        if name != "anchored" and "anchored" in run.config.lm.arms:
            err.print(f"note: the {name} arm was trained without the anchor; --edit {edit} removes "
                      f"the anchored arm's directions from it, as a comparison", markup=False, highlight=False,
                      soft_wrap=True)
        return run, model, edited(model, run.config, edit)
    except AnchoringError as e:
        fail(str(e))


def _names_file(text: str) -> bool:
    """True when `text` is also the path of an existing file (a long or multi-line text never is)."""
    if "\n" in text or len(text) > 1024:
        return False
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL character
        return False


def _read_text(file: Path) -> str:
    """A text file exactly as written (line endings kept: the page shows a carriage return as ␍), less a
    leading byte-order mark, which is an encoding marker and not text; `-` reads standard input."""
    try:
        data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read --file {str(file)!r}: {getattr(e, 'strerror', None) or 'not UTF-8 text'}")
    return text.removeprefix("\ufeff")


@app.command("surprisal")
def surprisal_cmd(
    run_dir: Path = typer.Argument(..., help="a language-model run"),
    text: Optional[str] = typer.Argument(None, help="text to score, taken literally (or --file)"),
    file: Optional[Path] = typer.Option(None, "--file", help="read the text from this UTF-8 file (- reads standard input)"),
    arm: Optional[str] = typer.Option(None, "--arm", help="which arm's model (default: the first)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="which seed's model (default: the first)"),
    edit: Optional[str] = typer.Option(None, "--edit", help="suppress | delete | blind: show the text before and after"),
    out_path: Path = typer.Option(Path("surprisal.html"), "--out", help="where to write the page"),
) -> None:
    """Per-token surprisal, entropy and s₂ of a text under an LM run, as a page you open in a browser."""
    from anchoring.report.surprise_page import check_page_path, render_surprise, unknown_characters, write_surprise_page

    if text is None and file is None:
        fail("give the text to score as an argument or with --file")
    if text is not None and file is not None:
        fail("give the text as an argument or with --file, not both")
    try:
        check_page_path(out_path)  # before the minutes of scoring
    except AnchoringError as e:
        fail(f"--out {e}")
    if file is not None:
        text = _read_text(file)
    elif _names_file(text):  # scored as typed, but say so: `surprisal RUN notes.txt` most likely meant --file
        err.print(f"note: {text!r} is also a file; the argument is scored as text (use --file {text} for the file)",
                  markup=False, highlight=False, soft_wrap=True)
    run, model, after = _lm_models("surprisal", run_dir, arm, seed, edit)
    if len(run.data.tokenizer.encode(text)) < 2:  # a page of no scores; the library still renders one
        fail("nothing to score: the text is empty" if not text else
             f"nothing to score: {text!r} is one token, and a token is scored from the ones before it")
    try:
        which = f"{next(iter(run.arms)) if arm is None else arm} arm, seed {run.seeds[0] if seed is None else seed}"
        title = f"{run.path.resolve().name} ({run.config.name}): {which}" + (f", before and after {edit}" if edit else "")
        page = render_surprise(model, run.data.tokenizer, text, context=model.context, edited_model=after, title=title)
        runs.check_writable(out_path.parent)  # the page itself may exist: writing it again replaces it
        replacing = out_path.exists()
        write_surprise_page(out_path, page)
    except AnchoringError as e:
        fail(str(e))
    unseen = unknown_characters(run.data.tokenizer, text)
    if unseen:  # they were scored as the unknown token, so their numbers say nothing about the characters
        more = f" and {len(unseen) - 10} more" if len(unseen) > 10 else ""
        err.print(f"warning: the text has characters the model never saw in training, scored as the unknown token: "
                  f"{unseen[:10]!r}{more}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"page: {out_path}" + (" (replacing an earlier page)" if replacing else ""), markup=False, soft_wrap=True)


@app.command("generate")
def generate_cmd(
    run_dir: Path = typer.Argument(..., help="a language-model run"),
    prompt: str = typer.Option(..., "--prompt", help="text to continue"),
    arm: Optional[str] = typer.Option(None, "--arm", help="which arm (default: the first)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="which seed's model (default: the first)"),
    edit: Optional[str] = typer.Option(None, "--edit", help="suppress | delete | blind: continue with and without the edit"),
    n: int = typer.Option(200, "-n", help="tokens to generate"),
    temperature: float = typer.Option(0.8, "--temperature", help="0: greedy"),
    samples: int = typer.Option(2, "--samples", help="continuations per model (sampling seeds 0 … N−1)"),
) -> None:
    """Continuations of a prompt, side by side with and without an edit (same sampling seeds)."""
    if n < 1:
        fail(f"-n (tokens to generate) must be ≥ 1, got {n}")
    if samples < 1:
        fail(f"--samples (continuations per model) must be ≥ 1, got {samples}")
    if not 0 <= temperature < float("inf"):
        fail(f"--temperature must be a finite number ≥ 0 (0: greedy), got {temperature}")
    run, model, after = _lm_models("generate", run_dir, arm, seed, edit)
    try:
        which = f"{next(iter(run.arms)) if arm is None else arm} arm, seed {run.seeds[0] if seed is None else seed}"
        table = Table(title=Text(f"{run.config.name}: {which}"), show_lines=True)
        table.add_column("sample", justify="right")
        table.add_column("as trained")
        if after is not None:
            table.add_column(f"after {edit}")
        for k in range(samples):
            cells = [run.generate(prompt, n=n, temperature=temperature, sample_seed=k, model=model)]
            if after is not None:
                cells.append(run.generate(prompt, n=n, temperature=temperature, sample_seed=k, model=after))
            table.add_row(str(k), *[Text(c) for c in cells])  # plain text: Shakespeare's "[Exit.]" is not markup
    except AnchoringError as e:
        fail(str(e))
    out.print(table)


@app.command("labels")
def labels_cmd(
    concept: str = typer.Argument(..., help="violence | deception | milton"),
    corpus: str = typer.Option("shakespeare", "--corpus", help="shakespeare | milton | mixed | a folder of .txt files"),
    coverage: float = typer.Option(0.3, "--coverage", help="share of reference positives that carry a weak label"),
    false_positives: float = typer.Option(0.0, "--false-positives", help="share of reference negatives labelled"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="folder for report.html and summary.json"),
) -> None:
    """Weak labels for a text concept: rates per labelling function, overlaps, gold precision/recall."""
    from anchoring.domains.text.report import label_report

    try:
        rows, path, replacing = label_report(concept, corpus, coverage, false_positives, out_dir)
    except AnchoringError as e:
        fail(str(e))
    table = Table(title=Text(f"{concept} labels on {corpus}"))
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)
    if path is not None:
        out.print(f"report: {path / 'report.html'}" + (" (replacing an earlier labels report)" if replacing else ""),
                  markup=False, soft_wrap=True)
