"""Fixtures for tests that run on both storage backends (tests/backends.py): ``place`` is a local
directory or a fresh prefix on a moto S3 server started for this folder."""

from tests.backends import moto_s3, place, s3_env, s3_prefix  # noqa: F401 - fixtures
