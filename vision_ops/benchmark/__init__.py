"""`vision-ops bench`: the pipeline against its ceilings and its peers, on the same photographs."""
