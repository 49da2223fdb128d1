"""The interop tier's application package."""


def hello():
    print("hello from the interop-hello console script")
