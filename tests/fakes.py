"""Stand-ins for what leaves the machine, plugged in by dotted path through settings
(`PUSH_BACKEND`, `SUPPORT_TICKET_BACKEND`). They live here, not in a test module, so that the
dotted path stays valid wherever the tests that use them are."""

SENT = []


class RecordingPush:
    """Push is the one thing that leaves the machine: recorded in `SENT` instead."""

    method = "push"

    def send_offer(self, *, driver_id, event):
        SENT.append((driver_id, event))
        return True


class FakeHelpdesk:
    """An external helpdesk stand-in (what leaves the machine is mocked)."""

    calls: list = []

    def open_ticket(self, *, delivery, unassigned_order, type, priority, title, description, now):
        self.calls.append(("open", priority, title))
        return f"HD-{len(self.calls)}"

    def add_note(self, *, ticket_id, body, now):
        self.calls.append(("note", ticket_id))

    def raise_priority(self, *, ticket_id, priority, note, now):
        self.calls.append(("raise", ticket_id, priority))

    def retitle_ticket(self, *, ticket_id, title, note, now):
        self.calls.append(("retitle", ticket_id, title))

    def close_ticket(self, *, ticket_id, status, resolution, actor, now):
        self.calls.append(("close", ticket_id, status))
