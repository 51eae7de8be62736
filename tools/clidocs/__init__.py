"""Man pages and bash/zsh completion generated from the programs' argparse parsers.

``python -m tools.clidocs`` rewrites them; a test fails while a committed file differs from
what the parsers give now. Standard library only: argparse keeps everything needed (flags,
metavars, choices, help, subcommands), and a generator of our own writes man pages with the
sections a parser cannot hold (exit status, files) and completion that follows subcommands.
"""
