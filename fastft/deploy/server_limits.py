"""The limits of `fastft serve` that a user sets, with their defaults: here, apart from serve.py, so that the CLI
shows them in `fastft serve --help` without importing the server (its image and numpy imports)."""

MAX_UPLOAD_MB = 10.0  # the largest upload
READ_TIMEOUT_S = 30.0  # a client that sends nothing of its request body for this long gets 408 and is disconnected
MAX_CONNECTIONS = 64  # open connections at once; more get 503 (stalled clients cannot hold the server's every socket)
