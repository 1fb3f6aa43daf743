"""The arena's vote log: one SQLite database in WAL mode, the only state that must survive.

Votes are data that must not be lost: each is committed (synchronous=FULL) before the voter sees the reveal, so a
kill loses no acknowledged vote; ratings are never stored, only recomputed by replaying the log in order. A match
is recorded when it is shown (its variants in display order, the image item) and can be voted once (UNIQUE). The
database records each variant's file digest and refuses a variant whose files changed since its votes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dilatequant.core.errors import UserError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS variants (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, kind TEXT NOT NULL, sha256 TEXT NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS matches (
    id TEXT PRIMARY KEY, shown TEXT NOT NULL, item INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, match_id TEXT NOT NULL UNIQUE REFERENCES matches(id),
    mode TEXT NOT NULL, places TEXT NOT NULL, voter TEXT NOT NULL, time REAL NOT NULL);
"""


class AlreadyVoted(UserError):
    """The match has its vote already (a replay or a double click)."""


class UnknownMatch(UserError):
    """No match of that id was shown by this arena."""


@dataclass(frozen=True)
class Match:
    id: str
    shown: tuple[str, ...]  # variant names in display order
    item: int  # index into the arena's image pool (condition and initial noise)


@dataclass(frozen=True)
class Vote:
    seq: int
    match_id: str
    shown: tuple[str, ...]
    item: int
    mode: str  # "best" | "rank"
    places: tuple[int, ...]  # per shown position; 0 = best, equal places are ties
    voter: str
    time: float


class ArenaStore:
    """Thread-safe access to one arena database (one connection behind a lock; SQLite serialises writers anyway)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise UserError(f"--db {self.path} is not a file: name a SQLite file (it is created if missing).")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a vote acknowledged is on disk
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise UserError(f"--db {self.path} is not an arena database ({exc}); name a new file.") from exc
        self._check_version()

    def _check_version(self) -> None:
        found = self.meta("schema_version")
        if found is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(found) != SCHEMA_VERSION:
            raise UserError(f"{self.path} has arena schema {found}; this dilatequant reads {SCHEMA_VERSION}. Use a new --db.")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def meta(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def register_variant(self, name: str, spec: str, kind: str, sha256: str) -> None:
        """Record a served variant; refuse one whose files differ from those its recorded votes were cast on."""
        with self.lock:
            row = self.db.execute("SELECT sha256, spec FROM variants WHERE name = ?", (name,)).fetchone()
            if row is None:
                self.db.execute("INSERT INTO variants VALUES (?, ?, ?, ?, ?)", (name, spec, kind, sha256, time.time()))
            elif row[0] != sha256:
                raise UserError(
                    f"Variant '{name}' ({spec}) has files with sha256 {sha256[:12]}…, but {self.path} holds votes for "
                    f"'{name}' served from {row[1]} with sha256 {row[0][:12]}…: votes for different files must not mix. "
                    f"Serve the changed variant under a new name, or use a new --db."
                )

    def variants(self) -> dict[str, dict]:
        with self.lock:
            rows = self.db.execute("SELECT name, spec, kind, sha256, added FROM variants ORDER BY added").fetchall()
        return {r[0]: {"spec": r[1], "kind": r[2], "sha256": r[3], "added": r[4]} for r in rows}

    def new_match(self, shown: list[str], item: int) -> Match:
        match = Match(uuid.uuid4().hex, tuple(shown), item)
        with self.lock:
            self.db.execute("INSERT INTO matches VALUES (?, ?, ?, ?)", (match.id, json.dumps(shown), item, time.time()))
        return match

    def match(self, match_id: str) -> Match:
        with self.lock:
            row = self.db.execute("SELECT shown, item FROM matches WHERE id = ?", (match_id,)).fetchone()
        if row is None:
            raise UnknownMatch(f"No match '{match_id}' was shown by this arena; ask /api/match for one.")
        return Match(match_id, tuple(json.loads(row[0])), row[1])

    def add_vote(self, match: Match, mode: str, places: list[int], voter: str) -> None:
        """Commit one vote; AlreadyVoted if the match has one (the UNIQUE constraint decides, race-free)."""
        with self.lock:
            try:
                self.db.execute("INSERT INTO votes (match_id, mode, places, voter, time) VALUES (?, ?, ?, ?, ?)",
                                (match.id, mode, json.dumps(places), voter, time.time()))  # fmt: skip
            except sqlite3.IntegrityError as exc:
                raise AlreadyVoted(f"Match '{match.id}' was voted already; each match takes one vote.") from exc

    def votes(self) -> list[Vote]:
        """Every vote in commit order (the order ratings are replayed in)."""
        with self.lock:
            rows = self.db.execute(
                "SELECT v.seq, v.match_id, m.shown, m.item, v.mode, v.places, v.voter, v.time "
                "FROM votes v JOIN matches m ON m.id = v.match_id ORDER BY v.seq"
            ).fetchall()
        return [Vote(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4], tuple(json.loads(r[5])), r[6], r[7]) for r in rows]


def export_rows(votes: list[Vote]) -> Iterator[dict]:
    """Flat rows for CSV/JSON export: one per vote, the shown order and places as 'a|b|c' strings."""
    for vote in votes:
        yield {"seq": vote.seq, "match_id": vote.match_id, "shown": "|".join(vote.shown), "item": vote.item, "mode": vote.mode,
               "places": "|".join(map(str, vote.places)), "voter": vote.voter, "time": vote.time}  # fmt: skip
