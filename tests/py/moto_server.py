"""moto's S3 server with atomic conditional writes.

moto checks `If-None-Match: *` / `If-Match` and then writes, with no lock, in a threaded
server: two concurrent conditional creates of the same key can both succeed, which real S3 never
allows. The chaos harness's 30-minute run found a duplicated row that this race explains (two
writers' commit markers at one start offset). Every object PUT goes through one lock here, so a
precondition is checked and applied atomically, as S3 does.

Usage: moto_server.py [moto_server arguments], e.g. -H 127.0.0.1 -p 5000
"""
import sys
import threading

from moto.s3.responses import S3Response
from moto.server import main

_LOCK = threading.Lock()
_put_object = S3Response.put_object


def _atomic_put_object(self, *args, **kwargs):
    with _LOCK:
        return _put_object(self, *args, **kwargs)


S3Response.put_object = _atomic_put_object

if __name__ == "__main__":
    main(sys.argv[1:])
