"""A running S3-compatible server as the tests see it (the fixtures are in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3-compatible server and the environment variables holding its keys."""

    endpoint_url: str
    key_var: str = "TF_TEST_S3_KEY"
    secret_var: str = "TF_TEST_S3_SECRET"
    key: str = "tierflow-test-key"
    secret: str = "tierflow-test-secret-d0n0tl0g"

    def storage_options(self) -> dict[str, str]:
        """Options as a user writes them: credentials only as ``${VAR}``."""
        return {
            "key": "${" + self.key_var + "}",
            "secret": "${" + self.secret_var + "}",
            "endpoint_url": self.endpoint_url,
        }

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing) and return ``s3://name``."""
        import s3fs

        fs = s3fs.S3FileSystem(
            key=self.key, secret=self.secret, endpoint_url=self.endpoint_url,
            skip_instance_cache=True,
        )
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"
