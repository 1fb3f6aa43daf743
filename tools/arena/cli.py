"""`dilatequant arena serve | judge | export | simulate`."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import click

from dilatequant.core.atomic import atomic_write_text
from dilatequant.core.errors import UserError
from dilatequant.core.output import check_writable_file

from ..options import Group, sampler_options
from .gallery import ITEMS
from .judges import JUDGES
from .ratings import RATING_MODELS
from .service import ArenaConfig

DB = Path("arena.sqlite")


def default(field: str):
    """ArenaConfig's default for `field`: the CLI and the Python API share one."""
    return ArenaConfig.__dataclass_fields__[field].default


@click.group("arena", cls=Group)
def arena() -> None:
    """K-Sort Arena: rank model variants by K-wise human (or metric) votes on images from identical noise."""


def arena_options(command: Callable) -> Callable:
    """The variants, vote store, gallery and rating options `serve` and `judge` share: the command gets `open_arena`,
    a context manager that generates (or reuses) the images and opens the Arena, once its own checks passed."""

    @click.option("--variant", "variants", multiple=True, required=True, metavar="NAME=PATH",
                  help="A variant to rank: a bundled model name, model directory, calibration artifact or engine directory. Repeat.")
    @click.option("--k", default=default("k"), show_default=True, type=click.IntRange(min=2), help="Images per match.")
    @click.option("--db", default=DB, show_default=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="SQLite vote log (created if missing; WAL).")
    @click.option("--images", default=ITEMS, show_default=True, type=click.IntRange(min=1),
                  help="Items (condition + initial noise) in the image pool of every variant.")
    @click.option("--gallery", default=None, type=click.Path(file_okay=False, path_type=Path), help="Image cache [default: DB.images/ beside --db].")
    @click.option("--rating", default=default("rating"), show_default=True, type=click.Choice(list(RATING_MODELS)),
                  help="k-sort: the paper's pairwise K-wise update; trueskill: the deployed multi-player update.")
    @click.option("--reference", default=None, metavar="NAME", help="The FP variant: 'tied with the reference' and the psnr judge.")
    @click.option("--bootstrap", default=default("bootstrap"), show_default=True, type=click.IntRange(min=0), help="Leaderboard bootstrap resamples.")
    @click.option("--alpha", default=default("alpha"), show_default=True, type=float, help="UCB exploration weight.")
    @click.option("--clamp", is_flag=True, help="Engine variants run timesteps outside their calibrated range with the nearest bucket.")
    @sampler_options
    @functools.wraps(command)
    def wrapper(variants, k, db, images, gallery, rating, reference, bootstrap, alpha, clamp, sampler, device, **kwargs):
        from .gallery import Gallery, parse_variant
        from .service import Arena
        from .store import ArenaStore

        config = ArenaConfig(k=k, rating=rating, reference=reference, bootstrap=bootstrap, alpha=alpha)
        parsed = [parse_variant(text) for text in variants]
        pool = Gallery(gallery or db.with_name(db.name + ".images"), images, sampler, device, clamp)

        @contextlib.contextmanager
        def open_arena() -> Iterator[Arena]:
            store = ArenaStore(db)
            try:
                arena = Arena(store, pool, parsed, config)  # first: refuses changed variants before generating images
                pool.ensure(parsed, progress=click.echo)
                yield arena
            finally:
                store.close()

        return command(open_arena=open_arena, **kwargs)

    return wrapper


@arena.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; non-loopback needs --public.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(min=0, max=65535))
@click.option("--public", is_flag=True, help="Allow a non-loopback --host: anyone who can reach it can vote.")
@arena_options
def serve_command(open_arena, host: str, port: int, public: bool) -> None:
    """Serve the arena's vote page and leaderboard (Ctrl-C stops; committed votes are kept)."""
    from .app import check_bind, serve

    check_bind(host, public)  # before any image is generated
    with open_arena() as arena:
        click.echo(f"arena: {len(arena.names)} variants, {arena.store.path} holds {len(arena.store.votes())} votes; "
                   f"vote at http://{host}:{port}/  leaderboard at http://{host}:{port}/leaderboard")  # fmt: skip
        serve(arena, host, port, public)


@arena.command("judge")
@click.option("--judge", "judge_name", required=True, type=click.Choice(list(JUDGES)), help="The metric that votes.")
@click.option("--votes", "matches", default=100, show_default=True, type=click.IntRange(min=1),
              help="Matches the judge ranks (a match whose images it cannot tell apart gets no vote).")
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path), help="Also write the leaderboard as JSON.")
@arena_options
def judge_command(open_arena, judge_name: str, matches: int, out: Path | None) -> None:
    """Pre-fill an arena with a metric judge's votes, then print the leaderboard."""
    if out is not None:
        check_writable_file(out)
    with open_arena() as arena:
        cast = arena.judge(judge_name, matches, progress=click.echo)
        board = arena.leaderboard()
    click.echo(f"arena judge {judge_name}: {cast} votes in {matches} matches")
    rows = board["rows"]
    if out is not None:
        atomic_write_text(out, json.dumps(board, indent=1))
    for row in rows:
        click.echo(f"{row['name']:>24}  μ {row['mu']:6.2f}  σ {row['sigma']:5.2f}  μ−3σ {row['conservative']:6.2f}  votes {row['votes']}")


@arena.command("export")
@click.option("--db", default=DB, show_default=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Votes as .csv or .json.")
def export_command(db: Path, out: Path) -> None:
    """Write every vote (match, shown order, places, voter, time) and the served variants' digests."""
    from .store import ArenaStore, export_rows

    if out.suffix not in (".csv", ".json"):
        raise UserError(f"--out {out}: name a .csv or .json file.")
    check_writable_file(out)
    store = ArenaStore(db)
    try:
        rows = list(export_rows(store.votes()))
        variants = store.variants()
    finally:
        store.close()
    if out.suffix == ".json":
        text = json.dumps({"variants": variants, "votes": rows}, indent=1)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["seq", "match_id", "shown", "item", "mode", "places", "voter", "time"])
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    atomic_write_text(out, text)
    click.echo(f"wrote {out}: {len(rows)} votes over {len(variants)} variants")


@arena.command("simulate")
@click.option("--models", default=50, show_default=True, type=click.IntRange(min=4), help="Simulated variants.")
@click.option("--noise", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0), help="Share of votes that are a random order.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for simulation.json and simulation.png.")
def simulate_command(models: int, noise: float, seed: int, out: Path) -> None:
    """Votes each rating scheme needs before its ranking of simulated variants is right and stays right."""
    from .simulate import SimulationConfig, chart, simulate

    out.mkdir(parents=True, exist_ok=True)
    check_writable_file(out / "simulation.json")
    report = simulate(SimulationConfig(models=models, noise=noise, seed=seed), progress=click.echo)
    atomic_write_text(out / "simulation.json", json.dumps(report, indent=1))
    chart(report, out / "simulation.png")
    for scheme, votes in report["converged_at"].items():
        click.echo(f"{scheme:>32}: {'not converged' if votes is None else f'{votes} votes'}")
    click.echo(f"wrote {out / 'simulation.json'} and {out / 'simulation.png'}")
