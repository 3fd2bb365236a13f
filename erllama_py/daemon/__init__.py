"""The CLI daemon: its process (pid file, rotated log), its control socket (typed msgpack
messages, owner-only), and the client commands that talk to it."""
