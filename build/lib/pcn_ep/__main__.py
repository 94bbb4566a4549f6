"""``python -m pcn_ep {fit,validate,test,gradcheck} ...``: one entry point for every command."""
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "fit"
    if command == "gradcheck":
        from .gradcheck import main as gradcheck

        return gradcheck(argv[1:])
    from .cli import main as lightning_main

    return lightning_main(argv)


if __name__ == "__main__":
    sys.exit(main())
