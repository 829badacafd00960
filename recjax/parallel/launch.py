"""Placeholder: being written (replace this whole module)."""


def add_arguments(parser):
    pass


def run(args) -> int:
    print("error: not implemented yet")
    return 2
