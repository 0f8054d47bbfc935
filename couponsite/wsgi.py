"""WSGI entry point, served by gunicorn (see gunicorn.conf.py)."""

import io
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "couponsite.settings")


class ChunkedBodies:
    """Hands Django the body of a request sent with `Transfer-Encoding: chunked`.

    Django reads as many bytes of a body as CONTENT_LENGTH says, and a chunked request has
    none, so a valid claim sent that way reached the API empty. gunicorn decodes the
    chunks and marks its input as ending with the body (`wsgi.input_terminated`), so it is
    read here, up to one byte more than DATA_UPLOAD_MAX_MEMORY_SIZE: enough for Django to
    refuse a larger body with 413, as it does a large body of known length.
    """

    def __init__(self, application: Callable[..., Iterable[bytes]]) -> None:
        self.application = application

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if (
            "CONTENT_LENGTH" not in environ
            and "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
            and environ.get("wsgi.input_terminated")
        ):
            body = environ["wsgi.input"].read(settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
        return self.application(environ, start_response)


application = ChunkedBodies(get_wsgi_application())

from coupons.access import check_api_auth  # noqa: E402 - needs the settings, set up above.

# Said in every worker's start-up log while the API is open to anyone (API_AUTH off), as
# `manage.py check --deploy` says it.
for warning in check_api_auth(None):
    logging.getLogger("coupons").warning(warning.msg)
