"""KAP records and their mapping to FHIR (layer 1, pure core: no IO).

`inputs` checks a clinic record against its JSON Schema, `transforms` is the registry of named
value transforms, `paths` the mappings' FHIR path language, `mapping` runs the data in
`mappings/` both ways (record <-> FHIR), and
`pipeline` chains record -> input check -> mapping -> profile check.

May import layer 0 and `validation` (the pipeline's last step).
"""
