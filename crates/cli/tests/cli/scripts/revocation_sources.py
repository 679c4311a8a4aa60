# A partner CA's revocation web server for the foreign-revocation tests: serves the files of
# the current directory (its CRL) over plain HTTP, and /hang answers nothing, ever (a responder
# that hangs). Prints its port, then serves until killed.
import http.server, threading, time


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def hang(self):
        while True:
            time.sleep(3600)

    def do_GET(self):
        if self.path.startswith("/hang"):
            self.hang()
        return super().do_GET()

    def do_POST(self):
        if self.path.startswith("/hang"):
            self.hang()
        self.send_error(405)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
