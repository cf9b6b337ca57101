"""quart, where modelpool leans on what quart does without documenting it: in this one
module, so that a new quart is read against it; tests/test_seams.py checks each still
holds. (The rest, `QuartTrio`, `request`, `g`, `Response` and werkzeug's exceptions, is
quart's and werkzeug's documented API, used where it is needed.)

- The methods a path allows: quart's request context keeps the URL adapter that routed
  the request (`request_ctx.url_adapter`, as Flask's does), and werkzeug's adapter lists
  them (`allowed_methods`). app.py answers OPTIONS with them, in JSON.
"""

from __future__ import annotations

from quart.globals import request_ctx


def allowed_methods() -> list[str]:
    """The methods the path of the request being handled allows, sorted."""
    adapter = request_ctx.url_adapter
    assert adapter is not None  # a request is routed as its context is made
    return sorted(adapter.allowed_methods())
