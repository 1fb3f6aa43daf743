"""K-Sort Arena (issue 16): rank the variants a user is choosing between by K-wise human votes. `ratings.py` and
`matchmaking.py` are web-free (the math, testable alone); the server, vote store and simulation build on them."""
