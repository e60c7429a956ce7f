from spice_ray.cli import main

main()
