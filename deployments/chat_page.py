"""The chat page's static files (serve_app/static/), served by the ingress at `GET /`.

They are read in the ingress replica, through the `serve_app` package the replica imports,
not on the machine that built the app: Serve pickles the ingress, and a path computed where
`serve run` ran may not exist on the node the replica lands on.
"""

from importlib import resources

from fastapi.responses import Response

from deployments.errors import TGIError

INDEX = "index.html"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


class ChatPage:
    """The page's files, held in memory (a few kB): no disk read per request."""

    def __init__(self, package: str = "serve_app", folder: str = "static"):
        directory = resources.files(package) / folder
        self._files = {
            entry.name: (entry.read_bytes(), _MEDIA_TYPES[suffix])
            for entry in directory.iterdir()
            if (suffix := "." + entry.name.rpartition(".")[2]) in _MEDIA_TYPES
        }
        if INDEX not in self._files:
            raise FileNotFoundError(f"{package}/{folder}/{INDEX} is missing")

    def response(self, name: str = INDEX) -> Response:
        """The file as a response; 404 for a name the folder does not hold."""
        if name not in self._files:
            raise TGIError(f"no static file {name!r}", 404, "not_found")
        content, media_type = self._files[name]
        # no-cache: a redeployed app's page is picked up at the next load.
        return Response(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
