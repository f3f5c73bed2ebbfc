from trainer.cli import main_entry

main_entry()
