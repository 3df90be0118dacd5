"""Helpers shared by the tests and the bench: real TorchServe on free loopback ports (harness), generated
images (imaging), a blob-fitted model (blobs). Nothing here is a test, and nothing here imports tests/."""
