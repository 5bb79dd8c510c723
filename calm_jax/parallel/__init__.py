"""Scale-out: the ('data', 'model') device mesh, logical axis rules, and
multi-process helpers."""
