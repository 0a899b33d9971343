"""Data: raw readers (`sources`), the synthetic set (`synthetic`), TFDS preparation
(`tfds_builder`, `prepare`) and the tf.data pipeline (`pipeline`).

Kept import-free on purpose: `sources` and `synthetic` need only numpy/cv2/scipy, while
`tfds_builder`, `prepare.prepare` and `pipeline` pull in TensorFlow, which must be imported after
torchvision in a process that uses both. Import the submodule you need.
"""
