"""A test-only Databend HTTP front end over the real embedded Databend engine (`pip install
databend`), speaking the subset of Databend's HTTP API that lakesink's Databend sink uses.

Usage: databend_server.py --port P --dir DIR [--user U --password P]

Protocol (as documented for Databend's HTTP handler):
- POST /v1/query  {"sql", "session", "pagination": {"max_rows_per_page", "wait_time_secs"},
  "stage_attachment"} -> QueryResponse {"id", "session_id", "node_id", "session", "schema":
  [{"name", "type"}], "data": [[string | null]], "state": "Succeeded" | "Failed", "error":
  null | {"code", "message"}, "stats", "affect", "next_uri", "final_uri", "stats_uri",
  "kill_uri"}. Errors in SQL come back as HTTP 200 with `error` set, like Databend.
  Rows are paged: `next_uri` (GET) returns the next page, `final_uri` (GET) closes the query.
  The `session` object must be echoed on the next request; it carries `txn_state`
  (`AutoCommit` / `Active` / `Fail`) and `need_sticky`.
- PUT /v1/upload_to_stage, headers `x-databend-stage-name` (`~` is the user stage) and
  `x-databend-relative-path`, multipart field `upload` -> {"id", "stage_name", "state":
  "SUCCESS", "files": [name]}.
- Basic auth; a wrong password gets 401.

Each session in a transaction has its own engine `SessionContext` (all of one tenant, so they
share one catalog), so transactions of different sessions really overlap, and the engine's own
conflict detection decides between them at COMMIT, as on a Databend server (a transaction that
lost answers `TableVersionMismatched`, code 2009). Statements outside a transaction run on a
pooled context. Statements themselves run one at a time: the embedded engine's local meta store
panics (`unreachable`, meta/store/src/lib.rs) when several threads use it at once, which a
Databend server, with its meta service, does not share. A transaction whose client went silent for `--txn-idle-secs` is rolled back (like a
Databend session that expired); its client then gets `CurrentTransactionIsAborted` (4002). The
user stage `@~` is an `fs://` stage under DIR. Each statement is executed exactly once
(`collect()` re-executes; `to_py_arrow()` is used for statements that return rows and panics on
MERGE, so MERGE uses `collect()`).
"""
import argparse
import base64
import cgi
import datetime
import decimal
import json
import os
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
ENGINE = threading.Lock()  # one statement at a time in the embedded engine (see above)
POOL = []  # idle engine contexts: {"ctx", "db"}
BOUND = {}  # session id -> context of its open transaction: {"ctx", "db", "last", "busy"}
QUERIES = {}
ARGS = None
TENANT = "lakesink"
NODE = "lakesink-test-node"

ROW_STATEMENTS = ("SELECT", "SHOW", "DESC", "DESCRIBE", "EXPLAIN", "WITH", "COPY", "LIST")


def to_text(v):
    if v is None:
        return None
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, datetime.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray)):
        return v.hex().upper()
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    if isinstance(v, decimal.Decimal):
        return format(v, "f")
    return str(v)


def rewrite_stage(sql):
    # The user stage `@~` is an fs:// stage in this process.
    return re.sub(r"@~(/|\b)", r"@lakesink_user_stage\1", sql)


def new_context():
    from databend import SessionContext

    with ENGINE:
        return {"ctx": SessionContext(tenant=TENANT), "db": None}


def run_sql(w, sql):
    """Executes one statement on context `w`; returns (schema, rows)."""
    sql = rewrite_stage(sql)
    head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
    df = w["ctx"].sql(sql)
    if head in ROW_STATEMENTS:
        batches = df.to_py_arrow()
        if not batches:
            return [], []
        schema = [{"name": f.name, "type": str(f.type)} for f in batches[0].schema]
        rows = []
        for b in batches:
            cols = [b.column(i).to_pylist() for i in range(b.num_columns)]
            for r in range(b.num_rows):
                rows.append([to_text(c[r]) for c in cols])
        return schema, rows
    df.collect()
    return [], []


def use_database(w, db):
    """Statements run in the session's current database, like a Databend session."""
    if w["db"] == db:
        return
    try:
        w["ctx"].sql('USE "' + db.replace('"', '""') + '"').collect()
        w["db"] = db
    except BaseException:
        # The database may not exist yet (CREATE DATABASE comes first): stay where we are.
        pass


def new_session(req_session):
    s = dict(req_session or {})
    s.setdefault("database", "default")
    s.setdefault("settings", {})
    s.setdefault("txn_state", "AutoCommit")
    internal = s.get("internal")
    try:
        sid = json.loads(internal)["id"] if internal else None
    except (ValueError, KeyError, TypeError):
        sid = None
    s["internal"] = json.dumps({"id": sid or str(uuid.uuid4())})
    return s


def session_id(session):
    return json.loads(session["internal"])["id"]


def rollback(w):
    try:
        with ENGINE:
            w["ctx"].sql("ROLLBACK").collect()
    except BaseException:
        pass


def expire_idle_txns():
    """Rolls back transactions whose client went silent (called under LOCK)."""
    now = time.time()
    for sid, w in list(BOUND.items()):
        if not w["busy"] and now - w["last"] > ARGS.txn_idle_secs:
            del BOUND[sid]
            rollback(w)
            print(f"rolled back the idle transaction of session {sid}", file=sys.stderr, flush=True)


def execute(session, sql):
    """Runs `sql` for `session`; returns (schema, rows, error)."""
    sid = session_id(session)
    head = sql.strip().rstrip(";").upper()
    with LOCK:
        expire_idle_txns()
        w = BOUND.get(sid)
        in_txn = w is not None
        if in_txn:
            w["busy"] = True
        else:
            w = POOL.pop() if POOL else None
    if w is None:
        w = new_context()
    try:
        if session.get("txn_state") == "Active" and not in_txn:
            # The server rolled this session's transaction back (idle): it is gone.
            session["txn_state"] = "Fail"
        if session.get("txn_state") == "Fail" and head not in ("ROLLBACK", "COMMIT"):
            return [], [], {"code": 4002, "message": "current transaction is aborted, commands ignored until end of transaction block"}
        if session.get("txn_state") == "Fail":
            session["txn_state"] = "AutoCommit"
            if in_txn:
                w = None  # see COMMIT below: not reused
                in_txn = False
            return [], [], None
        try:
            with ENGINE:
                use_database(w, session.get("database") or "default")
                schema, rows = run_sql(w, sql)
            error = None
        except BaseException as e:  # the engine raises RuntimeError (and panics) with its text
            schema, rows = [], []
            msg = str(e)
            m = re.search(r"Code: (\d+)", msg)
            error = {"code": int(m.group(1)) if m else 1001, "message": msg}
        if head in ("BEGIN", "BEGIN TRANSACTION") and error is None:
            in_txn = True
            session["txn_state"] = "Active"
        elif head in ("COMMIT", "ROLLBACK", "ABORT"):
            if error is not None or w.get("failed"):
                # A context whose transaction failed is not reused: the engine has been seen
                # to hit `unreachable` in the next transaction of such a context.
                w = None
            in_txn = False
            session["txn_state"] = "AutoCommit"
        elif in_txn and error is not None:
            w["failed"] = True
            session["txn_state"] = "Fail"
        session["need_sticky"] = in_txn
        return schema, rows, error
    finally:
        with LOCK:
            if in_txn:
                w["busy"] = False
                w["last"] = time.time()
                BOUND[sid] = w
            else:
                BOUND.pop(sid, None)
                if w is not None:
                    POOL.append(w)


def response(qid, session, schema, rows, error, page, page_size):
    start = page * page_size
    chunk = rows[start:start + page_size]
    more = start + page_size < len(rows)
    return {
        "id": qid,
        "session_id": session_id(session),
        "node_id": NODE,
        "session": session,
        "schema": schema,
        "data": chunk,
        "state": "Failed" if error else "Succeeded",
        "error": error,
        "warnings": [],
        "stats": {
            "scan_progress": {"rows": len(rows), "bytes": 0},
            "write_progress": {"rows": 0, "bytes": 0},
            "result_progress": {"rows": len(chunk), "bytes": 0},
            "running_time_ms": 0.0,
        },
        "affect": None,
        "result_timeout_secs": 60,
        "stats_uri": f"/v1/query/{qid}",
        "final_uri": f"/v1/query/{qid}/final",
        "next_uri": f"/v1/query/{qid}/page/{page + 1}" if more else None,
        "kill_uri": f"/v1/query/{qid}/kill",
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorized(self):
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        return user == ARGS.user and password == ARGS.password

    def body(self):
        n = int(self.headers.get("Content-Length", "0"))
        return self.rfile.read(n) if n else b""

    def do_POST(self):
        if not self.authorized():
            self.body()
            return self.reply(401, {"error": {"code": 401, "message": "authentication failed"}})
        if self.path != "/v1/query":
            return self.reply(404, {"error": {"code": 404, "message": f"no route {self.path}"}})
        try:
            req = json.loads(self.body())
        except ValueError as e:
            return self.reply(400, {"error": {"code": 400, "message": f"bad request: {e}"}})
        session = new_session(req.get("session"))
        page_size = int((req.get("pagination") or {}).get("max_rows_per_page") or 10000)
        schema, rows, error = execute(session, req.get("sql", ""))
        qid = str(uuid.uuid4())
        QUERIES[qid] = (session, schema, rows, error, page_size)
        self.reply(200, response(qid, session, schema, rows, error, 0, page_size))

    def do_GET(self):
        if not self.authorized():
            return self.reply(401, {"error": {"code": 401, "message": "authentication failed"}})
        m = re.fullmatch(r"/v1/query/([^/]+)/(page/(\d+)|final|kill)", self.path)
        if not m or m.group(1) not in QUERIES:
            return self.reply(404, {"error": {"code": 404, "message": f"query not found: {self.path}"}})
        qid = m.group(1)
        session, schema, rows, error, page_size = QUERIES[qid]
        if m.group(3) is not None:
            return self.reply(200, response(qid, session, schema, rows, error, int(m.group(3)), page_size))
        QUERIES.pop(qid, None)
        body = response(qid, session, schema, [], error, 0, page_size)
        body["next_uri"] = None
        self.reply(200, body)

    def do_PUT(self):
        if not self.authorized():
            self.body()
            return self.reply(401, {"error": {"code": 401, "message": "authentication failed"}})
        if self.path != "/v1/upload_to_stage":
            return self.reply(404, {"error": {"code": 404, "message": f"no route {self.path}"}})
        stage = self.headers.get("x-databend-stage-name", "~")
        rel = self.headers.get("x-databend-relative-path", "").strip("/")
        if stage != "~" or ".." in rel.split("/"):
            self.body()
            return self.reply(400, {"error": {"code": 400, "message": f"unsupported stage {stage!r} / path {rel!r}"}})
        form = cgi.FieldStorage(
            fp=self.rfile,
            headers=self.headers,
            environ={"REQUEST_METHOD": "PUT", "CONTENT_TYPE": self.headers["Content-Type"]},
        )
        item = form["upload"]
        name = os.path.basename(item.filename)
        dest_dir = os.path.join(ARGS.dir, "stage", rel)
        os.makedirs(dest_dir, exist_ok=True)
        tmp = os.path.join(dest_dir, f".{name}.{uuid.uuid4()}")
        with open(tmp, "wb") as f:
            f.write(item.file.read())
        os.replace(tmp, os.path.join(dest_dir, name))
        self.reply(200, {"id": str(uuid.uuid4()), "stage_name": stage, "state": "SUCCESS", "files": [name]})


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--user", default="root")
    ap.add_argument("--password", default="")
    ap.add_argument("--txn-idle-secs", type=float, default=5.0)
    ARGS = ap.parse_args()
    os.makedirs(os.path.join(ARGS.dir, "stage"), exist_ok=True)
    # The engine keeps its data under the working directory (`.databend/`): keep it in DIR.
    ARGS.dir = os.path.abspath(ARGS.dir)
    os.chdir(ARGS.dir)
    # The engine keeps its data in the working directory (`.databend/`).
    w = new_context()
    POOL.append(w)
    w["ctx"].sql(f"CREATE STAGE IF NOT EXISTS lakesink_user_stage URL = 'fs://{os.path.abspath(ARGS.dir)}/stage/'").collect()
    server = ThreadingHTTPServer(("127.0.0.1", ARGS.port), Handler)
    print(f"databend test server on 127.0.0.1:{ARGS.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
