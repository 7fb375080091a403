"""The ingestion service: the FastAPI app (``memlm.serve.app``) and its httpx client (``memlm.serve.client``).

Needs the ``server`` extra; importing this package imports neither.
"""
