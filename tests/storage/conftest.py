"""The storage tests' fixtures: the moto S3 server and the two-backend ``place`` (tests/backends.py,
shared with tests/faults/)."""

from tests.backends import (  # noqa: F401 - fixtures and helpers, registered here for this folder
    MotoS3,
    free_port,
    moto_s3,
    place,
    s3_auth,
    s3_env,
    s3_prefix,
    start_server,
)
