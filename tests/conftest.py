"""Session-wide hooks of the test suite."""


def pytest_terminal_summary(terminalreporter):
    """Print the bad-input campaign's count table (tests/test_bad_input_campaign.py) when it ran."""
    import sys

    campaign = sys.modules.get("tests.campaign")
    if campaign is None or not campaign.RECORDED:
        return
    terminalreporter.section("bad-input campaign (tests/campaign.py)")
    for line in campaign.table(campaign.RECORDED).splitlines():
        terminalreporter.write_line(line)
