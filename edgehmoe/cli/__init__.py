"""Command lines: ``edgehmoe`` (:mod:`.main`), ``edgehmoe-client`` (:mod:`.client`), shared
argument groups and the one error-to-exit-code policy (:mod:`.common`)."""
