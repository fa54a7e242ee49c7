"""Runs a script's ``main(argv) -> int`` in the test process as ``raise SystemExit(main())`` would end it."""


def run_main(main, argv) -> None:
    """``main(argv)``; a non-zero exit status raises ``SystemExit`` with it (as the script's process would end)."""
    rc = main([str(a) for a in argv])
    if rc:
        raise SystemExit(rc)
