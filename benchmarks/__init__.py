"""The benchmark harness: any object with `search(query, k)` is measured the same way."""
