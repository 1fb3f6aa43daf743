"""The arena's web app: a small FastAPI app (two static pages and a JSON API) served by uvicorn.

Why not Gradio, which K-Sort Arena itself uses: this arena shows precomputed images and records votes, so it needs
no model-serving UI; FastAPI/Starlette is a few MB against Gradio's hundreds, starts in a second, and its routes are
plain functions a test can call over loopback. Images are addressed by (match id, position), never by file name:
no path from a request reaches the file system, and a URL does not reveal which variant made the image.
"""

# No `from __future__ import annotations`: FastAPI reads the vote model from the route's live annotation.
import ipaddress
import re
import socket
from importlib import resources
from typing import Literal

from dilatequant.core.errors import UserError
from dilatequant.core.optional import require

from .service import Arena, InvalidVote
from .store import AlreadyVoted, UnknownMatch

MAX_BODY = 4096  # bytes: a vote is well under 200
VOTER = re.compile(r"^[A-Za-z0-9_:-]{1,64}$")
MATCH_ID = re.compile(r"^[0-9a-f]{32}$")
STATUS = {InvalidVote: 422, UnknownMatch: 404, AlreadyVoted: 409}


def page(name: str) -> str:
    return resources.files("dilatequant.tools.arena").joinpath("static", name).read_text()


def is_loopback(host: str) -> bool:
    """True for loopback addresses and names that resolve only to loopback (localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_bind(host: str, public: bool) -> None:
    if not public and not is_loopback(host):
        raise UserError(f"Refusing to serve the arena on {host}: other machines could vote and read its images. "
                        f"Keep the default --host 127.0.0.1, or pass --public to serve it on {host} anyway.")  # fmt: skip


def create_app(arena: Arena):
    fastapi = require("fastapi", "The arena's web server", "arena")
    responses = require("fastapi.responses", "The arena's web server", "arena")
    pydantic = require("pydantic", "The arena's web server", "arena")
    exceptions = require("fastapi.exceptions", "The arena's web server", "arena")

    class VoteBody(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        match_id: str = pydantic.Field(pattern=MATCH_ID.pattern)
        mode: Literal["best", "rank"]
        voter: str = pydantic.Field(pattern=VOTER.pattern)
        best: list[int] | None = pydantic.Field(default=None, max_length=16)
        places: list[int] | None = pydantic.Field(default=None, max_length=16)

    app = fastapi.FastAPI(title="dilatequant arena", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str):
        return responses.JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def limit_body(request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return error(413, f"Request body over {MAX_BODY} bytes; a vote is a small JSON object.")
        if request.method == "POST" and length is None:
            return error(411, "A vote needs a Content-Length header.")
        return await call_next(request)

    @app.exception_handler(exceptions.RequestValidationError)
    async def invalid(request, exc):
        where = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
        return error(422, f"Malformed vote ({where}). Expected JSON: match_id, mode ('best' or 'rank'), voter, best or places.")

    @app.exception_handler(UserError)
    async def user_error(request, exc):
        return error(STATUS.get(type(exc), 400), str(exc))

    @app.get("/", response_class=responses.HTMLResponse)
    def index():
        return page("index.html")

    @app.get("/leaderboard", response_class=responses.HTMLResponse)
    def leaderboard_page():
        return page("leaderboard.html")

    @app.get("/api/match")
    def match():
        found, prompt = arena.new_match()
        return {"match_id": found.id, "prompt": prompt, "k": len(found.shown),
                "images": [f"/images/{found.id}/{position}.png" for position in range(len(found.shown))]}  # fmt: skip

    @app.post("/api/vote")
    def vote(body: VoteBody):
        return arena.vote(body.match_id, body.mode, body.voter, body.best, body.places)

    @app.get("/api/leaderboard")
    def leaderboard():
        return arena.leaderboard()

    @app.get("/images/{match_id}/{position}.png")
    def image(match_id: str, position: int):
        if not MATCH_ID.match(match_id):
            return error(404, "No such image.")
        found = arena.store.match(match_id)
        if not 0 <= position < len(found.shown):
            return error(404, f"Position {position} is outside the match's {len(found.shown)} images.")
        return responses.FileResponse(arena.gallery.path(found.shown[position], found.item), media_type="image/png",
                                      headers={"Cache-Control": "no-store"})  # fmt: skip

    return app


def serve(arena: Arena, host: str, port: int, public: bool = False) -> None:
    """Run the app until interrupted (Ctrl-C); votes are committed as they come, so stopping loses none."""
    check_bind(host, public)
    uvicorn = require("uvicorn", "The arena's web server", "arena")
    uvicorn.run(create_app(arena), host=host, port=port, log_level="warning")
