"""Presigns an MSK IAM `kafka-cluster:Connect` request with botocore at a fixed time, the way
AWS's aws-msk-iam-sasl-signer-python does, and prints the URL (without the user agent).
Usage: sigv4_vector.py REGION ACCESS_KEY_ID SECRET EPOCH_SECONDS [SESSION_TOKEN]"""
import datetime
import sys
from unittest import mock

from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

region, akid, secret, epoch = sys.argv[1:5]
token = sys.argv[5] if len(sys.argv) > 5 else None
when = datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc).replace(tzinfo=None)
request = AWSRequest(
    method="GET",
    url=f"https://kafka.{region}.amazonaws.com/",
    params={"Action": "kafka-cluster:Connect"},
)
with mock.patch("botocore.auth.get_current_datetime", return_value=when):
    SigV4QueryAuth(Credentials(akid, secret, token), "kafka-cluster", region, expires=900).add_auth(request)
print(request.url)
