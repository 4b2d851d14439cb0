"""Dovecot's virtual mailbox plugin (``src/plugins/virtual``) on top of :mod:`dovecot_index`.

Headers (``virtual``, ``virtual2``, ``virtual-guid``), the ``dovecot-virtual`` config and the
sync algorithm arrive in later steps; for now the binary layer decodes the extension headers
for ``dump``.
"""
