"""Orchestration: a bridge session and its isolated routes, over cluster, transport and local.

``session`` connects and closes a bridge; ``isolation`` opens routes for it through the
``RouteHost`` protocol it declares (so it never imports the session); ``connection`` holds
what both build. Rule: imports the layers below (``cluster``, ``transport``, ``local``,
``core``), never the pytest face (``plugin``, ``settings``, ``cli``, ``doctor``); no pytest.
"""
