"""A site's PACS as its data source: ``[data.source]`` in the site config, ``atoll site pull``, the local mirror.

The PACS stays the source of truth and is only read. ``atoll site pull`` asks it (QIDO-RS or C-FIND) which
instances match the site's query, fetches the ones not yet mirrored (WADO-RS, C-MOVE or C-GET), checks each one
and commits a complete mirror in the site's state folder. Everything above the mirror (indexing, quarantine, cache,
labels, pseudonyms, card, ClientApp) reads it exactly like an exported folder; a round never talks to the PACS.

Modules, one concept each:

- :mod:`client.pacs.source`: the ``[data.source]`` table, validated like the rest of the site config
- :mod:`client.pacs.errors`: the failures a PACS really has, each with a one-line message and an exit code
- :mod:`client.pacs.transport`: what a pull needs from a PACS (list matching instances, fetch some of them)
- :mod:`client.pacs.dicomweb` / :mod:`client.pacs.dimse`: the two transports (dicomweb-client, pynetdicom)
- :mod:`client.pacs.verify`: is a retrieved object the instance that was asked for, and is it DICOM
- :mod:`client.pacs.mirror`: the on-disk mirror (staging, quarantine, journaled commit, readiness check)
- :mod:`client.pacs.pull`: one synchronisation round (list, diff, fetch, verify, commit)
- :mod:`client.pacs.fingerprint`: the keyed dataset fingerprint (folder and PACS sites alike)
- :mod:`client.pacs.cli`: ``atoll site pull``

Heavy libraries (dicomweb-client, pynetdicom, requests) are imported only by the transports, so loading a site
config or checking the mirror before a round stays cheap.
"""
