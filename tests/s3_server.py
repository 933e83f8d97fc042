"""A real S3 API server (moto's server mode) on 127.0.0.1, for the tests and bench/storage.py.

    with S3Server() as s3:            # s3.env: the AWS variables a `curate` process needs
        s3.client.create_bucket(Bucket="data")

The variables are also set in this process (pyarrow, DuckDB's registered filesystem and boto3
read them), and restored on exit.
"""
from __future__ import annotations

import os


class S3Server:
    def __enter__(self) -> S3Server:
        import boto3
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                    "AWS_DEFAULT_REGION": "us-east-1"}
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self.client = boto3.client("s3")
        return self

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def __exit__(self, *exc) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.server.stop()
