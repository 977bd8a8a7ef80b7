"""A minimal registry endpoint over mutual TLS, for the client's CA / client-certificate test.
Serves GET /schemas/ids/1. Usage: tls_registry.py SERVER_CERT SERVER_KEY CA PORT_FILE"""
import http.server
import json
import ssl
import sys

cert, key, ca, port_file = sys.argv[1:5]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"schema": '{"type":"record","name":"E","fields":[{"name":"x","type":"long"}]}'}).encode()
        self.send_response(200 if self.path == "/schemas/ids/1" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.load_verify_locations(ca)
ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
server.socket = ctx.wrap_socket(server.socket, server_side=True)
with open(port_file, "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
