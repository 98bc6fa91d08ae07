print("balloond: under construction")
