"""Atoll console: a web page per role (site, lead, auditor), on top of client/, server/ and privacy/.

Like the ``atoll`` CLI it composes both sides and sits on top: nothing in client/, server/, privacy/ or models/
imports it, and it is not part of the Flower app bundle that sites hash and approve.
"""
