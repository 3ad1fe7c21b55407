"""rankone server: one frozen backbone, task prompts composed on the fly, mixed-task batches."""
