"""Headless Chromium for the page checks: Debian's chromium + chromedriver, and no traffic
to anything but the loopback test server."""

FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1300,1000",
    "--no-first-run", "--disable-extensions", "--disable-quic",
    # nothing but the live server: no background traffic to outside services
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--no-pings", "--disable-features=OptimizationHints,MediaRouter,Translate",
    # and no name resolves except the loopback server, so a stray CDN link cannot leave the machine
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
)


def chrome_options(binary: str):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # (csp_violations reads it)
    return options


def csp_violations(browser) -> list[str]:
    """What the page's Content-Security-Policy refused since the last read of the browser log."""
    return [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
