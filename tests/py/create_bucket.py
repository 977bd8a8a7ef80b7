"""Creates an S3 bucket (moto), an Azure container (Azurite) or a GCS bucket (fake-gcs-server)
for a test: create_bucket.py URL ENDPOINT"""
import sys
from urllib.parse import urlparse

from read_table import AZURITE_KEY

url, endpoint = sys.argv[1], sys.argv[2]
u = urlparse(url)
if u.scheme == "s3":
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    ).create_bucket(Bucket=u.netloc)
elif u.scheme == "az":
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    svc = BlobServiceClient(
        account_url=endpoint,
        credential={"account_name": "devstoreaccount1", "account_key": AZURITE_KEY},
    )
    try:
        svc.create_container(u.netloc)
    except ResourceExistsError:
        pass
elif u.scheme == "gs":
    import json
    import urllib.request

    req = urllib.request.Request(
        f"{endpoint}/storage/v1/b?project=test",
        data=json.dumps({"name": u.netloc}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(req).read()
else:
    raise SystemExit(f"unsupported url {url}")
