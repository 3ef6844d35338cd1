"""The local web page (``unetkit serve``): segment, correct + fine-tune, generate.

Needs the ``web`` extra (FastAPI, uvicorn, python-multipart). Everything the page loads is
shipped in ``unetkit/web/static``: no CDN, fonts or telemetry, so it works offline.
"""
