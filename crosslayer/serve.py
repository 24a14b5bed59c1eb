"""``crosslayer browse --serve``: the feature browser's site from a local server that also runs the model.

1. Static files: the site folder, as any static server would serve it (stdlib ``http.server``).
2. ``GET /api/info``: the dictionaries that can be steered and the request limits.
3. ``POST /api/steer`` (JSON: dictionary, feature, prompt, mode, value, at, tokens, seed): the intervention of
   :func:`crosslayer.interventions.steer` (next-token probabilities, clean vs steered, and KL) and, when
   ``tokens`` > 0, a seeded clean and steered generation (:func:`crosslayer.interventions.generate`).
   Requests are bounded (:data:`LIMITS`); one runs at a time (a second gets 429 while the first runs); every
   bad request gets a JSON ``{"error": "..."}`` with status 400 (the one-line message of the library's
   :class:`~crosslayer.errors.CrosslayerError`).
4. The server binds 127.0.0.1 unless another host is asked for explicitly.
"""

from __future__ import annotations

import json
import math
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from crosslayer.errors import CrosslayerError

LIMITS = {"max_body_bytes": 16_384, "max_prompt_chars": 2_000, "max_prompt_tokens": 256, "max_new_tokens": 48,
          "max_abs_value": 1e4, "top": 10}
"""Bounds of a steering request."""


class Steerer:
    """The model and dictionaries behind ``/api/steer``; :meth:`run` validates a request and runs it."""

    def __init__(self, model, dictionaries: dict):
        self.model, self.dictionaries = model, dictionaries
        self.lock = threading.Lock()

    def info(self) -> dict:
        return {"dictionaries": sorted(self.dictionaries), **LIMITS}

    def run(self, req: dict) -> dict:
        from crosslayer.interventions import AT, MODES, Edit, generate, steer

        if not isinstance(req, dict):
            raise CrosslayerError("the request body must be a JSON object")
        name = req.get("dictionary")
        if name not in self.dictionaries:
            raise CrosslayerError(f"unknown dictionary {name!r}; this server steers {sorted(self.dictionaries)}")
        dictionary = self.dictionaries[name]
        feature, tokens, seed = (_int(req, key, default) for key, default in (("feature", None), ("tokens", 0), ("seed", 0)))
        value = _float(req, "value", 0.0)
        mode, at, prompt = req.get("mode", "clamp"), req.get("at", "each"), req.get("prompt")
        if mode not in MODES or at not in AT:
            raise CrosslayerError(f"mode must be one of {', '.join(MODES)} and at one of {', '.join(AT)}")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > LIMITS["max_prompt_chars"]:
            raise CrosslayerError(f"prompt must be non-empty text of at most {LIMITS['max_prompt_chars']} characters")
        n_prompt = len(self.model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n_prompt > LIMITS["max_prompt_tokens"]:
            raise CrosslayerError(f"the prompt is {n_prompt} tokens; at most {LIMITS['max_prompt_tokens']} are allowed")
        if not 0 <= tokens <= LIMITS["max_new_tokens"] or abs(value) > LIMITS["max_abs_value"]:
            raise CrosslayerError(f"tokens must be 0..{LIMITS['max_new_tokens']} and |value| at most {LIMITS['max_abs_value']:g}")
        edits = [Edit(feature, mode, value)]
        table, summary = steer(self.model, dictionary, prompt, edits, top=LIMITS["top"], at=at)
        out = {"prompt": prompt, "kl": summary["kl"], "at": at, "layers": summary["layers"][feature],
               "clean_activation": summary["clean_activation"][feature], "tokens": table.to_dict("records"),
               "clean_text": None, "steered_text": None}
        if tokens:
            out["clean_text"] = generate(self.model, dictionary, prompt, [], max_new_tokens=tokens, seed=seed, at=at)
            out["steered_text"] = generate(self.model, dictionary, prompt, edits, max_new_tokens=tokens, seed=seed, at=at)
        return out


def _int(req: dict, key: str, default):
    value = req.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise CrosslayerError(f"{key} must be a whole number")
    return int(value)


def _float(req: dict, key: str, default: float) -> float:
    value = req.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CrosslayerError(f"{key} must be a finite number")
    return float(value)


class Handler(SimpleHTTPRequestHandler):
    """Static files from the site folder plus the two API routes."""

    steerer: Steerer

    def __init__(self, *args, steerer: Steerer, **kwargs):
        self.steerer = steerer
        super().__init__(*args, **kwargs)

    def log_message(self, format, *args):  # quiet: one line per API call only
        if self.path.startswith("/api/"):
            super().log_message(format, *args)

    def _json(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.split("?")[0] == "/api/info":
            return self._json(200, self.steerer.info())
        if self.path.startswith("/api/"):
            return self._json(404, {"error": f"no such API route {self.path}; use /api/info or POST /api/steer"})
        return super().do_GET()

    def do_POST(self):
        if self.path.split("?")[0] != "/api/steer":
            return self._json(404, {"error": f"no such API route {self.path}; POST to /api/steer"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._json(400, {"error": "bad Content-Length"})
        if length <= 0 or length > LIMITS["max_body_bytes"]:
            self.rfile.read(min(max(length, 0), 1 << 20))  # drain (bounded) so that the client reads the answer
            self.close_connection = True
            return self._json(413 if length > 0 else 400,
                              {"error": f"the request body must be 1..{LIMITS['max_body_bytes']} bytes of JSON"})
        raw = self.rfile.read(length)
        try:
            req = json.loads(raw)
        except ValueError:
            return self._json(400, {"error": "the request body is not valid JSON"})
        if not self.steerer.lock.acquire(blocking=False):
            return self._json(429, {"error": "another steering request is running; try again when it finishes"})
        try:
            status, answer = 200, self.steerer.run(req)
        except CrosslayerError as err:
            status, answer = 400, {"error": str(err)}
        except Exception as err:  # a bug must not kill the server; report it as JSON
            status, answer = 500, {"error": f"{type(err).__name__}: {err}"}
        finally:  # released before answering: a client that sends its next request on reading this one is not refused
            self.steerer.lock.release()
        return self._json(status, answer)


def make_server(site: str | Path, steerer: Steerer, *, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server of ``site`` with the steering API (not started; call ``serve_forever``). ``port`` 0: any free port."""
    site = Path(site)
    if not (site / "index.html").is_file():
        raise CrosslayerError(f"{site} holds no site (no index.html); build one with `crosslayer browse --dictionary DIR "
                              f"--store DIR --out {site}`")
    handler = partial(Handler, steerer=steerer, directory=str(site))
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise CrosslayerError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port") from None


def steerer_for_site(site: str | Path, *, model_dtype: str = "auto") -> Steerer:
    """Load the model and the dictionaries a site was built from (its ``site.json``)."""
    from crosslayer.browse import SITE_RECORD
    from crosslayer.dictionary import load_dictionary
    from crosslayer.models import load_model

    path = Path(site) / SITE_RECORD
    if not path.is_file():
        raise CrosslayerError(f"{site} is not a crosslayer site (no {SITE_RECORD}); build it first with "
                              "`crosslayer browse --dictionary DIR --store DIR --out SITE`")
    record = json.loads(path.read_text())
    dictionaries = {name: load_dictionary(p) for name, p in record["dictionaries"].items()}
    return Steerer(load_model(record["model"], dtype=model_dtype), dictionaries)
