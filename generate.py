"""generate: not implemented yet (see README status table)."""

import click


@click.command(context_settings=dict(help_option_names=['-h', '--help']))
def main() -> None:
    """Not implemented yet: this entry point lands with its issue (see README status table)."""
    raise click.ClickException('generate.py is not implemented yet; see the README status table')


if __name__ == '__main__':
    main()
